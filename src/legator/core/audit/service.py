"""Writing, querying, exporting and verifying the audit trail."""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import hashlib
import io
import re
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

from sqlalchemy import ColumnElement, Select, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.audit.models import AuditEvent
from legator.core.audit.sanitiser import CLIP_MARK, clip_for_log, sanitise, sanitise_text
from legator.core.audit.schemas import AuditEventOut, ChainReport
from legator.core.canonical import canonical_json
from legator.core.config import ConfigError
from legator.core.context import current_request_id
from legator.core.db import Database, new_id, retention, utcnow
from legator.core.security import constant_time_equal, hmac_sha256_hex

OUTCOMES = ("success", "failure", "denied", "error")
PURGE_ACTION = "audit.purge"
RETENTION_ACTOR = "legator:retention"  # who the scheduled purges are recorded as
_PG_CHAIN_LOCK = 0x4C4547  # advisory lock id serialising chain appends on PostgreSQL
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_HASH = re.compile(r"^[0-9a-fA-F]{64}\Z")
_NEVER = datetime.min.replace(tzinfo=UTC)
CSV_FIELDS = ("id", "ts", "actor", "action", "target", "outcome", "request_id", "details", "hash")

# Longest string kept in an event's details; the rest is cut and marked.
MAX_DETAIL_TEXT = 8192
CLIPPED = CLIP_MARK


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class InvalidCursor(ValueError):
    pass


class InvalidHead(ValueError):
    """A head handed back to ``verify`` that no report of this server could have given."""


class ChainKeyMismatch(ConfigError):
    """A writer's LEGATOR_AUDIT_CHAIN_KEY (or its absence) does not fit the chained log."""


@dataclass(frozen=True)
class PurgeResult:
    deleted: int
    cutoff: datetime
    anchor: str


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"a:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, seq = raw.partition(":")
        position = int(seq)
        # Beyond a 64-bit integer the database refuses the query itself (a 500, not a 400).
        if kind != "a" or not 0 <= position < 2**63:
            raise ValueError
        return position
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("cursor is not one this server handed out") from None


def head_of(event: AuditEvent) -> str:
    """The token a report gives for its newest chained event: its hash and its time."""
    return f"{event.hash}@{event.ts.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


def parse_head(head: str) -> tuple[str, datetime]:
    digest, sep, stamp = head.strip().partition("@")
    try:
        moment = datetime.fromisoformat(stamp) if sep and _HASH.match(digest) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidHead("head must be the 'head' of an earlier report: HASH@TIME")
    return digest.lower(), moment


@dataclass
class _HeadCheck:
    """Whether the log still holds the event a head from an earlier report names. The chain
    alone cannot tell that its newest events were deleted: what is left still links up.

    Positions cannot tell a purge from a cut (SQLite numbers an emptied table afresh), so the
    head carries its event's time: it may be gone only if a purge recorded after it, in the
    verified chain, cut events older than it."""

    digest: str
    ts: datetime
    found: bool = False
    purged: bool = False

    def see(self, event: AuditEvent) -> None:
        if event.hash == self.digest:
            self.found = True
        elif event.hash is not None and event.action == PURGE_ACTION and event.ts >= self.ts:
            self.purged = self.purged or _cutoff(event) > self.ts

    def problem(self) -> str | None:
        """Why the log fails the head, or None (only asked of a chain that verified)."""
        if self.found or self.purged:
            return None
        return (
            f"the event the head names (written {self.ts.isoformat()}) is gone and no purge "
            "took it: events were deleted from the end of the log"
        )


def _cutoff(purge: AuditEvent) -> datetime:
    """The ``older_than`` a purge record names; the earliest time when it names none."""
    stamp = purge.details.get("older_than") if isinstance(purge.details, dict) else None
    try:
        moment = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return _NEVER
    return moment


def _chain_material(event: AuditEvent) -> str:
    return canonical_json(
        {
            "id": event.id,
            "ts": event.ts.isoformat(),
            "actor": event.actor,
            "action": event.action,
            "target": event.target,
            "outcome": event.outcome,
            "details": event.details,
            "request_id": event.request_id,
            "prev": event.prev_hash or "",
        }
    )


_INSERT = insert(AuditEvent.__table__)
_INSERTED = tuple(c.name for c in AuditEvent.__table__.columns if c.name != "seq")


def to_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut.model_validate(event, from_attributes=True)


class AuditService:
    def __init__(
        self, db: Database, chain_key: bytes | None = None, *, check_key: bool = False
    ) -> None:
        """``check_key``: before its first append, make sure the key (or its absence) fits
        the log, refusing (ChainKeyMismatch) rather than writing an event that breaks the
        chain. For writers beside the server, such as the offline CLI, whose environment
        may lack the server's key."""
        self.db = db
        self.chain_key = chain_key
        self._key_unchecked = check_key

    async def record(
        self,
        session: AsyncSession,
        *,
        actor: str,
        action: str,
        target: str = "",
        outcome: str = "success",
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> AuditEvent:
        """Append one event inside the caller's write transaction (atomic with the action)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {', '.join(OUTCOMES)}")
        event = AuditEvent(
            id=new_id(),
            ts=utcnow(),
            actor=sanitise_text(actor)[:200],
            action=action[:100],
            target=sanitise_text(target)[:500],
            outcome=outcome,
            details=sanitise(_clipped(details or {})),
            request_id=(request_id if request_id is not None else current_request_id())[:64],
        )
        await self._lock_chain(session)
        if self._key_unchecked:
            await self._check_key(session)
        if self.chain_key is not None:
            last = await session.scalar(
                select(AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
            )
            event.prev_hash = last
            event.hash = hmac_sha256_hex(self.chain_key, _chain_material(event))
        # A Core INSERT: an ORM add + flush per event cost several times the write itself.
        values = {column: getattr(event, column) for column in _INSERTED}
        await (await session.connection()).execute(_INSERT, values)
        return event

    async def _check_key(self, session: AsyncSession) -> None:
        """Refuse to append to a chained log without its key, or with another key: the event
        would fail verification, and it would be too late to tell who wrote it and how."""
        if problem := await self._key_problem(session):
            raise ChainKeyMismatch(problem)
        self._key_unchecked = False

    async def key_problem(self) -> str | None:
        """Why this writer's key (or its absence) does not fit the chained log, or None."""
        async with self.db.session() as session:
            return await self._key_problem(session)

    async def _key_problem(self, session: AsyncSession) -> str | None:
        newest = await session.scalar(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1))
        if newest is None or newest.hash is None:
            return None
        if self.chain_key is None:
            return (
                "LEGATOR_AUDIT_CHAIN_KEY: not set, but the audit log is hash-chained; set "
                "the key the server uses (an event written without it would break the chain)"
            )
        expected = hmac_sha256_hex(self.chain_key, _chain_material(newest))
        if not constant_time_equal(expected, newest.hash):
            return (
                "LEGATOR_AUDIT_CHAIN_KEY: not the key the audit log is chained with (its "
                "newest event does not verify under it); set the key the server uses"
            )
        return None

    async def _lock_chain(self, session: AsyncSession) -> None:
        """Serialise chain appends and purges on PostgreSQL (SQLite writers already queue on
        ``BEGIN IMMEDIATE``): a purge must not miss an event still being appended, which would
        survive it older than the anchor its record names."""
        if self.chain_key is not None and not self.db.is_sqlite:
            await session.execute(text(f"SELECT pg_advisory_xact_lock({_PG_CHAIN_LOCK})"))

    async def log(self, **fields: Any) -> AuditEvent:
        """Append one event in a transaction of its own."""
        async with self.db.write() as session:
            return await self.record(session, **fields)

    def _filtered(self, query: Select[Any], flt: AuditFilter) -> Select[Any]:
        if flt.actor:
            query = query.where(AuditEvent.actor == flt.actor)
        if flt.action:
            query = (
                query.where(AuditEvent.action.startswith(flt.action[:-1], autoescape=True))
                if flt.action.endswith("*")
                else query.where(AuditEvent.action == flt.action)
            )
        if flt.target:
            query = query.where(AuditEvent.target == flt.target)
        if flt.outcome:
            query = query.where(AuditEvent.outcome == flt.outcome)
        if flt.since:
            query = query.where(AuditEvent.ts >= flt.since)
        if flt.until:
            query = query.where(AuditEvent.ts < flt.until)
        return query

    async def query(
        self, flt: AuditFilter, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[AuditEventOut], str | None]:
        """Newest first; ``cursor`` continues where the previous page ended."""
        query = self._filtered(select(AuditEvent), flt).order_by(AuditEvent.seq.desc())
        if cursor:
            query = query.where(AuditEvent.seq < _decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list((await session.scalars(query.limit(limit + 1))).all())
        next_cursor = _encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
        return [to_out(row) for row in rows[:limit]], next_cursor

    async def iterate(self, flt: AuditFilter, batch: int = 500) -> AsyncIterator[AuditEvent]:
        """Oldest first, in batches, for exports: every row, whatever its ``seq`` (one the
        database never hands out, written behind the server's back, is exported too)."""
        after: int | None = None
        while True:
            query = self._filtered(select(AuditEvent), flt).order_by(AuditEvent.seq).limit(batch)
            if after is not None:
                query = query.where(AuditEvent.seq > after)
            async with self.db.session() as session:
                rows = list((await session.scalars(query)).all())
            for row in rows:
                yield row
            if len(rows) < batch:
                return
            after = rows[-1].seq

    async def export_ndjson(self, flt: AuditFilter) -> AsyncIterator[str]:
        async for event in self.iterate(flt):
            yield to_out(event).model_dump_json() + "\n"

    async def export_csv(self, flt: AuditFilter) -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_FIELDS)
        async for event in self.iterate(flt):
            out = to_out(event)
            cells = (
                out.id,
                out.ts.isoformat(),
                out.actor,
                out.action,
                out.target,
                out.outcome,
                out.request_id,
                canonical_json(out.details),
                out.hash or "",
            )
            writer.writerow([_csv_cell(cell) for cell in cells])
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    async def verify(self, head: str | None = None) -> ChainReport:
        """Walk every row oldest first and recompute each link of the chain.

        The report names the newest chained event as ``head`` (``HASH@TIME``). Given the
        head of an earlier report, kept where whoever can change the database cannot,
        verification also fails when that event is gone or replaced: the newest events were
        deleted. InvalidHead for a head no report could have given.

        The chain starts at the oldest hashed event (the anchor). Rows without a hash may only
        precede a chain that starts afresh (``prev_hash`` empty: the key was set on an existing
        log, or on an empty one); they are counted as ``unchained``. An anchor that links to
        an earlier event needs a purge record inside the verified chain naming it: only the
        newest chained purge counts, and the event it names (itself, when it left none) must
        be the oldest row of the log. Rows the database never numbers (``seq`` < 1) fail."""
        check = _HeadCheck(*parse_head(head)) if head is not None else None
        return await self._verify(self.iterate(AuditFilter()), check)

    async def _verify(
        self, events: AsyncIterator[AuditEvent], head: _HeadCheck | None = None
    ) -> ChainReport:
        """``verify`` over ``events``, every row of the log oldest first."""
        if self.chain_key is None:
            return ChainReport(
                chained=False,
                ok=False,
                checked=0,
                unchained=0,
                message="no LEGATOR_AUDIT_CHAIN_KEY is configured: the log is not chained",
            )
        checked = unchained = 0
        previous: str | None = None
        first: AuditEvent | None = None  # the oldest row
        anchor: AuditEvent | None = None  # the oldest hashed row: where the chain starts
        purge_left: str | None = None  # the oldest event the newest chained purge left
        newest: AuditEvent | None = None  # the newest hashed row: the head
        async for event in events:
            if head is not None:
                head.see(event)
            name = anchor.id if anchor else None
            if event.seq < 1:
                why = "the event sits at a position the database never hands out"
                return self._broken(checked, unchained, name, event, why)
            first = first or event
            if event.hash is None:
                if anchor is not None:
                    return self._broken(checked, unchained, name, event, "an event has no hash")
                unchained += 1
                continue
            if anchor is None:
                anchor, previous = event, event.prev_hash
            expected = hmac_sha256_hex(self.chain_key, _chain_material(event))
            if event.prev_hash != previous or not constant_time_equal(expected, event.hash):
                return self._broken(checked, unchained, anchor.id, event, "hash mismatch")
            if event.action == PURGE_ACTION:
                left = event.details.get("anchor") if isinstance(event.details, dict) else None
                purge_left = left if isinstance(left, str) else event.id
            previous = event.hash
            newest = event
            checked += 1
        if anchor is not None and anchor.prev_hash is not None and purge_left != anchor.id:
            why = "earlier events are missing and no purge says so"
            return self._broken(0, unchained, anchor.id, anchor, why)
        if first is not None and purge_left is not None and purge_left != first.id:
            why = "the event precedes the oldest event the last purge left"
            return self._broken(0, unchained, anchor.id if anchor else None, first, why)
        report = ChainReport(
            chained=True,
            ok=True,
            checked=checked,
            unchained=unchained,
            anchor=anchor.id if anchor else None,
            head=head_of(newest) if newest else None,
            head_event=newest.id if newest else None,
            message=f"{checked} chained events verified",
        )
        return report if head is None else _with_head(report, head)

    async def purge(self, cutoff: datetime, *, actor: str) -> PurgeResult:
        """Delete events older than ``cutoff``; the purge itself is recorded, naming the oldest
        event left so that verification can start from it."""
        async with self.db.write() as session:
            await self._lock_chain(session)
            last = await session.scalar(
                select(func.max(AuditEvent.seq)).where(await self._older(session, cutoff))
            )
            deleted = await self._delete_through(session, last)
            anchor = await self._record_purge(session, cutoff, actor, deleted)
        return PurgeResult(deleted=deleted, cutoff=cutoff, anchor=anchor)

    async def purge_in_batches(
        self, cutoff: datetime, *, actor: str, batch: int = retention.PRUNE_BATCH
    ) -> int:
        """``purge`` for a schedule: ``batch`` events per transaction, oldest first, each batch
        recorded as a purge naming the new oldest event, so the chain verifies between batches
        too; nothing recorded when nothing is old enough. Returns how many went."""
        deleted = 0
        while True:
            async with self.db.write() as session:
                await self._lock_chain(session)
                oldest = (
                    select(AuditEvent.seq)
                    .where(await self._older(session, cutoff))
                    .order_by(AuditEvent.seq)
                    .limit(batch)
                    .subquery()
                )
                batch_deleted = await self._delete_through(
                    session, await session.scalar(select(func.max(oldest.c.seq)))
                )
                if not batch_deleted:  # nothing old enough, or another replica purged it
                    return deleted
                await self._record_purge(session, cutoff, actor, batch_deleted)
            deleted += batch_deleted
            await asyncio.sleep(retention.PRUNE_PAUSE_S)

    @staticmethod
    async def _older(session: AsyncSession, cutoff: datetime) -> ColumnElement[bool]:
        """The events older than ``cutoff`` that precede every event from ``cutoff`` on: a
        purge cuts the log by position, and one stamped long ago by a replica whose clock ran
        behind must not take the younger events written before it along."""
        kept = await session.scalar(select(func.min(AuditEvent.seq)).where(AuditEvent.ts >= cutoff))
        older = AuditEvent.ts < cutoff
        return older if kept is None else older & (AuditEvent.seq < kept)

    @staticmethod
    async def _delete_through(session: AsyncSession, last: int | None) -> int:
        """Delete the events up to ``last`` by position: cut by position in the log, not by
        time alone, so the chain never gets a hole."""
        if last is None:
            return 0
        result = await session.execute(delete(AuditEvent).where(AuditEvent.seq <= last))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def _record_purge(
        self, session: AsyncSession, cutoff: datetime, actor: str, deleted: int
    ) -> str:
        """Record a purge, naming the oldest event left (the chain's new anchor); returns
        that event's id, or the purge's own when none is left."""
        oldest = await session.scalar(select(AuditEvent).order_by(AuditEvent.seq).limit(1))
        event = await self.record(
            session,
            actor=actor,
            action=PURGE_ACTION,
            target="audit",
            details={
                "older_than": cutoff.isoformat(),
                "deleted": deleted,
                "anchor": oldest.id if oldest else None,
            },
        )
        return oldest.id if oldest else event.id

    async def bundle(self, target: BinaryIO) -> int:
        """Write a zip for auditors: every event (NDJSON), the chain report and a manifest of
        SHA-256 sums. Returns the number of events."""
        count = 0
        with tempfile.TemporaryFile() as events:

            async def written() -> AsyncIterator[AuditEvent]:
                nonlocal count
                async for event in self.iterate(AuditFilter()):
                    events.write(to_out(event).model_dump_json().encode() + b"\n")
                    count += 1
                    yield event

            # The report is over the very rows the file holds, not a second reading of a log
            # that the running server keeps appending to (or purging) meanwhile.
            rows = written()
            report = (await self._verify(rows)).model_dump_json(indent=2).encode()
            async for _ in rows:  # a broken chain ends the check early, not the export
                pass
            events.seek(0)
            # Compressing and hashing a large log takes seconds: not on the event loop.
            await asyncio.to_thread(_write_bundle, target, events, report, count)
        return count

    @staticmethod
    def _broken(
        checked: int, unchained: int, anchor: str | None, event: AuditEvent, why: str
    ) -> ChainReport:
        return ChainReport(
            chained=True,
            ok=False,
            checked=checked,
            unchained=unchained,
            anchor=anchor,
            first_break=event.id,
            message=f"chain broken at event {event.id}: {why}",
        )


def _with_head(report: ChainReport, head: _HeadCheck) -> ChainReport:
    """``report`` of a chain that verified, judged against the head of an earlier report."""
    problem = head.problem()
    if problem is None:
        kept = "still in the log" if head.found else "purged since"
        return report.model_copy(update={"message": f"{report.message}; the head given is {kept}"})
    return report.model_copy(update={"ok": False, "message": f"chain broken: {problem}"})


def _csv_cell(value: str) -> str:
    """``value`` with a leading formula character neutralised by a single quote (OWASP's
    advice against CSV injection): a spreadsheet would otherwise run ``=HYPERLINK(…)`` typed
    as a user name."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _write_bundle(target: BinaryIO, events: BinaryIO, report: bytes, count: int) -> None:
    files: list[dict[str, Any]] = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        digest = hashlib.sha256()
        size = 0
        with archive.open("events.ndjson", "w") as out:
            while chunk := events.read(1 << 16):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        files.append({"name": "events.ndjson", "sha256": digest.hexdigest(), "size": size})
        archive.writestr("verification.json", report)
        files.append(
            {
                "name": "verification.json",
                "sha256": hashlib.sha256(report).hexdigest(),
                "size": len(report),
            }
        )
        manifest = {"created_at": utcnow().isoformat(), "events": count, "files": files}
        archive.writestr("manifest.json", canonical_json(manifest))


def _clipped(value: Any, *, _depth: int = 0) -> Any:
    """``value`` with every string (keys too) cut at MAX_DETAIL_TEXT: details can carry what a
    client sent (a User-Agent, a name), and a row must not grow by megabytes each time. A long
    string is sanitised before its cut, which could leave a secret's start unrecognisable."""
    if isinstance(value, str):
        return value if len(value) <= MAX_DETAIL_TEXT else clip_for_log(value, MAX_DETAIL_TEXT)
    if _depth > 32:
        return value  # sanitise() redacts what is deeper
    if isinstance(value, dict):
        return {_clipped(k): _clipped(v, _depth=_depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clipped(item, _depth=_depth + 1) for item in value]
    return value
