"""Probes: registration, key checks, liveness (batched heartbeats, offline sweep) and views."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from legator.core.audit.service import AuditService
from legator.core.db import Database, utcnow
from legator.core.errors import Conflict, NotFound, Unauthorized
from legator.core.events import InMemoryEventBus
from legator.core.logging import get_logger
from legator.core.security import sha256_hex
from legator.fleet.hub import Hub
from legator.fleet.metrics import FleetMetrics
from legator.fleet.models import Command, Probe
from legator.fleet.policies import DEFAULT_POLICY_ID
from legator.fleet.protocol import LEVELS, new_key_salt
from legator.fleet.schemas import Health, ProbeDetail, ProbeOut, RegisterRequest, Summary
from legator.fleet.tokens import TokenService

log = get_logger("legator.fleet.registry")
PROBE_KEY_PREFIX = "lpk_"
STATUSES = ("online", "degraded", "offline")
_DEGRADED_AT = 90.0


def new_probe_key() -> str:
    return PROBE_KEY_PREFIX + secrets.token_hex(32)


def status_from_metrics(metrics: dict[str, Any]) -> str:
    hot = any(
        float(metrics.get(name, 0) or 0) >= _DEGRADED_AT
        for name in ("cpu_percent", "memory_percent", "disk_percent")
    )
    return "degraded" if hot else "online"


class ProbeRegistry:
    def __init__(
        self,
        db: Database,
        audit: AuditService,
        events: InMemoryEventBus,
        hub: Hub,
        metrics: FleetMetrics,
        *,
        offline_after_s: float,
        flush_interval_s: float,
    ) -> None:
        self.db = db
        self.audit = audit
        self.events = events
        self.hub = hub
        self.metrics = metrics
        self.offline_after_s = offline_after_s
        self.flush_interval_s = flush_interval_s
        # The hub signs with the key of each probe's current enrolment, which the row holds.
        hub.salts = self.key_salt
        # Liveness buffered in memory and written in one transaction per interval.
        self._seen: dict[str, datetime] = {}
        self._beats: dict[str, dict[str, Any]] = {}

    # ---- enrolment ---------------------------------------------------------------------

    async def register(self, body: RegisterRequest) -> tuple[Probe, str]:
        """A new probe for a new hostname; or, with a token bound to a probe, that probe with a
        new key (its old key and connection end). Refused, with the token left unused, when
        the hostname belongs to a probe the token is not for.

        Every enrolment draws a new key salt, so the probe's signing key
        (``hub.key_for(probe.id, probe.key_salt)``) is new too: whoever kept the old
        ``probe.yaml`` can neither connect nor sign anything the re-enrolled probe accepts."""
        api_key = new_probe_key()
        async with self.db.write() as session:
            consumed = await TokenService.consume(session, body.token)
            if consumed is None:
                raise Unauthorized("enrolment token is invalid, expired or already used")
            named = await session.scalar(select(Probe).where(Probe.hostname == body.hostname))
            if consumed.probe_id is None:
                if named is not None:
                    raise Conflict(
                        f"a probe with hostname {body.hostname!r} is already enrolled; "
                        "re-enrolling it takes a token made for it "
                        "(`legator tokens create --probe PROBE_ID`), or deleting it first"
                    )
                probe = Probe(
                    id=await self._free_id(session),
                    hostname=body.hostname,
                    policy_id=DEFAULT_POLICY_ID,
                    status="offline",
                    metrics={},
                    inventory={},
                    tags=body.tags,
                )
                session.add(probe)
            else:
                probe = await session.get(Probe, consumed.probe_id)
                assert probe is not None  # the token is deleted with its probe
                if named is not None and named.id != probe.id:
                    raise Conflict(
                        f"hostname {body.hostname!r} belongs to another probe ({named.id}); "
                        f"this token re-enrols {probe.id} ({probe.hostname})"
                    )
                probe.hostname = body.hostname
                if body.tags:
                    probe.tags = body.tags
            fresh = consumed.probe_id is None
            probe.os, probe.arch, probe.version = body.os, body.arch, body.version
            probe.key_hash = sha256_hex(api_key)
            probe.key_salt = new_key_salt()
            probe.pending_key_hash = probe.pending_key_salt = None
            try:
                await session.flush()
            except IntegrityError:
                # Another registration took the hostname since we looked.
                raise Conflict(
                    f"a probe with hostname {body.hostname!r} is already enrolled"
                ) from None
            await self.audit.record(
                session,
                actor=f"probe:{probe.id}",
                action="fleet.probe.register",
                target=probe.id,
                details={
                    "hostname": body.hostname,
                    "new": fresh,
                    "tags": probe.tags,
                    "token_id": consumed.token_id,
                },
            )
        if not fresh:
            await self.hub.disconnect(probe.id, code=4401, reason="probe re-enrolled")
        await self.events.publish(
            "probe.registered", {"probe_id": probe.id, "hostname": probe.hostname, "new": fresh}
        )
        return probe, api_key

    @staticmethod
    async def _free_id(session: Any) -> str:
        while True:
            candidate = "prb-" + secrets.token_hex(4)
            if await session.get(Probe, candidate) is None:
                return candidate

    async def authenticate(self, raw_key: str) -> Probe | None:
        """The probe a bearer key belongs to, as its row is now (``key_salt`` names the signing
        key that goes with the key). A key still pending rotation is accepted and promoted,
        with the signing key sent along with it: the probe saved both, so the old ones are
        now dead."""
        if not raw_key.startswith(PROBE_KEY_PREFIX):
            return None
        digest = sha256_hex(raw_key)
        async with self.db.session() as session:
            probe = await session.scalar(
                select(Probe).where(or_(Probe.key_hash == digest, Probe.pending_key_hash == digest))
            )
        if probe is not None and probe.pending_key_hash == digest:
            await self.promote_key(probe.id, digest)
            async with self.db.session() as session:
                probe = await session.scalar(select(Probe).where(Probe.key_hash == digest))
        return probe

    async def key_salt(self, probe_id: str) -> str | None:
        """The salt of the probe's current signing key; None if there is no such probe."""
        async with self.db.session() as session:
            return await session.scalar(select(Probe.key_salt).where(Probe.id == probe_id))

    async def promote_key(self, probe_id: str, digest: str, *, signing: bool = True) -> str | None:
        """Make the pending key (the one hashing to ``digest``) the probe's key, and its
        pending signing key salt the current one unless ``signing`` is False (the probe did
        not take the new signing key). The probe's key salt now; None if nothing was pending
        under ``digest`` (already promoted, or replaced)."""
        async with self.db.write() as session:
            probe = await session.get(Probe, probe_id)
            if probe is None or probe.pending_key_hash != digest:
                return None
            probe.key_hash, probe.pending_key_hash = digest, None
            salt, probe.pending_key_salt = probe.pending_key_salt, None
            rotated = signing and salt is not None
            if signing and salt is not None:
                probe.key_salt = salt
            await self.audit.record(
                session,
                actor=f"probe:{probe_id}",
                action="fleet.probe.key_rotated",
                target=probe_id,
                details={"signing_rotated": rotated},
            )
            return probe.key_salt

    async def set_pending_key(self, probe_id: str, raw_key: str, salt: str) -> None:
        """Remember a key being sent to the probe, with the salt of the signing key sent
        along: the probe's next connection with it (or its ack) promotes both."""
        async with self.db.write() as session:
            result = await session.execute(
                update(Probe)
                .where(Probe.id == probe_id)
                .values(pending_key_hash=sha256_hex(raw_key), pending_key_salt=salt)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"no probe with id {probe_id}")

    # ---- liveness ----------------------------------------------------------------------

    async def on_connect(self, probe_id: str) -> None:
        now = utcnow()
        async with self.db.write() as session:
            await session.execute(
                update(Probe)
                .where(Probe.id == probe_id)
                .values(status="online", connected_at=now, last_seen_at=now)
            )
        self.metrics.sockets.set(len(self.hub.connections))
        await self.events.publish("probe.connected", {"probe_id": probe_id})

    async def on_disconnect(self, probe_id: str) -> None:
        self.metrics.sockets.set(len(self.hub.connections))
        await self.events.publish("probe.disconnected", {"probe_id": probe_id})

    async def on_hello(self, probe_id: str, payload: dict[str, Any]) -> None:
        level = payload.get("max_level")
        values: dict[str, Any] = {"version": str(payload.get("version", ""))[:64]}
        if level in LEVELS:
            values["max_level"] = level
        async with self.db.write() as session:
            await session.execute(update(Probe).where(Probe.id == probe_id).values(**values))

    def touch(self, probe_id: str) -> None:
        self._seen[probe_id] = utcnow()

    def heartbeat(self, probe_id: str, metrics: dict[str, Any]) -> None:
        self._seen[probe_id] = utcnow()
        self._beats[probe_id] = metrics
        self.metrics.heartbeats.inc()

    async def save_inventory(self, probe_id: str, inventory: dict[str, Any]) -> None:
        async with self.db.write() as session:
            await session.execute(
                update(Probe)
                .where(Probe.id == probe_id)
                .values(inventory=inventory, inventory_at=utcnow(), last_seen_at=utcnow())
            )

    async def flush(self) -> int:
        """Write buffered liveness: one transaction, one executemany per kind of row."""
        seen, beats = self._seen, self._beats
        self._seen, self._beats = {}, {}
        if not seen:
            return 0
        with_metrics = [
            {
                "id": pid,
                "last_seen_at": seen[pid],
                "metrics": beats[pid],
                "status": status_from_metrics(beats[pid]),
            }
            for pid in beats
            if pid in seen
        ]
        plain = [{"id": pid, "last_seen_at": ts} for pid, ts in seen.items() if pid not in beats]
        async with self.db.write() as session:
            if with_metrics:
                await session.execute(update(Probe), with_metrics)
            if plain:
                await session.execute(update(Probe), plain)
        return len(seen)

    async def sweep(self) -> list[str]:
        """Mark probes with no contact for ``offline_after_s`` offline; refresh the gauges."""
        horizon = utcnow() - timedelta(seconds=self.offline_after_s)
        async with self.db.write() as session:
            stale = list(
                await session.scalars(
                    select(Probe.id).where(
                        Probe.status != "offline",
                        or_(Probe.last_seen_at.is_(None), Probe.last_seen_at < horizon),
                    )
                )
            )
            stale = [pid for pid in stale if pid not in self._seen]
            if stale:
                await session.execute(
                    update(Probe).where(Probe.id.in_(stale)).values(status="offline")
                )
            counts = dict(
                (
                    await session.execute(select(Probe.status, func.count()).group_by(Probe.status))
                ).all()
            )
        for status in STATUSES:
            self.metrics.probes.labels(status).set(counts.get(status, 0))
        for pid in stale:
            await self.events.publish("probe.offline", {"probe_id": pid})
        return stale

    async def run_liveness(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
                ticks += 1
                if ticks * self.flush_interval_s >= min(10.0, self.offline_after_s / 3):
                    ticks = 0
                    await self.sweep()
            except Exception:
                log.exception("fleet liveness pass failed")

    # ---- views -------------------------------------------------------------------------

    def _out(self, probe: Probe, cls: type[ProbeOut] = ProbeOut) -> ProbeOut:
        out = cls.model_validate(probe, from_attributes=True)
        out.connected = self.hub.is_connected(probe.id)
        return out

    async def get(self, probe_id: str) -> Probe:
        async with self.db.session() as session:
            probe = await session.get(Probe, probe_id)
        if probe is None:
            raise NotFound(f"no probe with id {probe_id}")
        return probe

    async def detail(self, probe_id: str) -> ProbeDetail:
        return self._out(await self.get(probe_id), ProbeDetail)  # type: ignore[return-value]

    async def rows(self, *, tag: str | None = None) -> list[Probe]:
        async with self.db.session() as session:
            probes = list(await session.scalars(select(Probe).order_by(Probe.hostname)))
        return [p for p in probes if tag is None or tag in (p.tags or [])]

    async def list(
        self, *, status: str | None = None, tag: str | None = None, q: str | None = None
    ) -> list[ProbeOut]:
        query = select(Probe).order_by(Probe.hostname)
        if status:
            query = query.where(Probe.status == status)
        if q:
            query = query.where(or_(Probe.hostname.contains(q), Probe.id.contains(q)))
        async with self.db.session() as session:
            probes = list(await session.scalars(query))
        if tag:
            probes = [p for p in probes if tag in (p.tags or [])]
        return [self._out(p) for p in probes]

    async def set_tags(self, probe_id: str, tags: list[str], *, actor: str) -> ProbeOut:
        async with self.db.write() as session:
            probe = await session.get(Probe, probe_id)
            if probe is None:
                raise NotFound(f"no probe with id {probe_id}")
            probe.tags = tags
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.probe.tags",
                target=probe_id,
                details={"tags": tags},
            )
        return self._out(probe)

    async def delete(self, probe_id: str, *, actor: str) -> None:
        async with self.db.write() as session:
            probe = await session.get(Probe, probe_id)
            if probe is None:
                raise NotFound(f"no probe with id {probe_id}")
            await session.execute(delete(Command).where(Command.probe_id == probe_id))
            await session.delete(probe)
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.probe.delete",
                target=probe_id,
                details={"hostname": probe.hostname},
            )
        await self.hub.disconnect(probe_id, code=4401, reason="probe deleted")

    async def cleanup(self, older_than: timedelta, *, actor: str) -> list[str]:
        horizon = utcnow() - older_than
        async with self.db.write() as session:
            ids = list(
                await session.scalars(
                    select(Probe.id).where(
                        Probe.status == "offline",
                        or_(
                            Probe.last_seen_at < horizon,
                            and_(Probe.last_seen_at.is_(None), Probe.registered_at < horizon),
                        ),
                    )
                )
            )
            ids = [pid for pid in ids if not self.hub.is_connected(pid)]
            if ids:
                await session.execute(delete(Command).where(Command.probe_id.in_(ids)))
                await session.execute(delete(Probe).where(Probe.id.in_(ids)))
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.cleanup",
                target="fleet",
                details={"removed": ids, "older_than_s": older_than.total_seconds()},
            )
        return ids

    async def health(self, probe_id: str) -> Health:
        probe = await self.get(probe_id)
        score, reasons = 100, []
        if probe.status == "offline":
            score -= 60
            reasons.append(f"offline: no contact for more than {self.offline_after_s:.0f}s")
        elif not self.hub.is_connected(probe.id):
            score -= 20
            reasons.append("not connected to this control plane")
        metrics = probe.metrics or {}
        if not metrics:
            score -= 10
            reasons.append("no heartbeat received yet")
        for name, label in (("cpu_percent", "CPU"), ("memory_percent", "memory")):
            value = float(metrics.get(name, 0) or 0)
            if value >= _DEGRADED_AT:
                score -= 15
                reasons.append(f"{label} at {value:.0f}%")
        disk = float(metrics.get("disk_percent", 0) or 0)
        if disk >= _DEGRADED_AT:
            score -= 20
            reasons.append(f"disk at {disk:.0f}%")
        elif disk >= 80:
            score -= 10
            reasons.append(f"disk at {disk:.0f}%")
        if not probe.inventory:
            score -= 5
            reasons.append("no inventory received yet")
        return Health(probe_id=probe.id, score=max(score, 0), status=probe.status, reasons=reasons)

    async def summary(self) -> Summary:
        async with self.db.session() as session:
            probes = list(await session.scalars(select(Probe)))
            pending = await session.scalar(
                select(func.count())
                .select_from(Command)
                .where(Command.status.in_(("dispatched", "running")))
            )
        by_status = Counter(p.status for p in probes)
        tags = Counter(tag for p in probes for tag in p.tags or [])
        return Summary(
            total=len(probes),
            by_status={s: by_status.get(s, 0) for s in STATUSES},
            connected=sum(1 for p in probes if self.hub.is_connected(p.id)),
            tags=dict(sorted(tags.items())),
            commands_pending=pending or 0,
        )

    async def inventory(self) -> list[dict[str, Any]]:
        async with self.db.session() as session:
            probes = list(await session.scalars(select(Probe).order_by(Probe.hostname)))
        return [
            {
                "probe_id": p.id,
                "hostname": p.hostname,
                "inventory_at": p.inventory_at,
                "inventory": p.inventory,
            }
            for p in probes
        ]
