"""The gateway's runtime: catalogue, scheduler, backends, usage, reservations and admission
of one inference request (reservation gate → resolve → slot), plus its accounting."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import aiohttp
from starlette.requests import Request

from legator.core.auth.principal import Principal
from legator.core.db import retention
from legator.core.errors import AppError, ServiceUnavailable, TooManyRequests
from legator.core.http.disconnect import ClientGone, wait_disconnect
from legator.core.logging import get_logger
from legator.core.runtime import Core
from legator.core.security import constant_time_equal, hmac_sha256_hex
from legator.gateway import backend_metrics
from legator.gateway.backends import Backend, BackendRegistry
from legator.gateway.catalog import Catalog
from legator.gateway.cluster import GatewaySync, Part
from legator.gateway.homes import Homes
from legator.gateway.hub.downloads import Downloads
from legator.gateway.metrics import GatewayMetrics
from legator.gateway.models import GatewaySetting
from legator.gateway.reservations import Reservations
from legator.gateway.scheduler import (
    Lease,
    PoolClosed,
    QueueFull,
    QueueTimeout,
    Scheduler,
    SchedulerConfig,
    SlotPool,
)
from legator.gateway.schemas import ModelOut, SchedulerSettings, SchedulerSettingsUpdate
from legator.gateway.supervisor import Supervisor
from legator.gateway.usage import (
    UsageRecord,
    UsageRecorder,
    prune,
    recent_tokens_by_user,
    tokens_by_user,
)

log = get_logger("legator.gateway")
# Marks a request one replica forwarded to another (gateway/forward.py): never forwarded again.
# Its value is derived from the signing key, so a client cannot forge it to be served by a
# replica of its choosing (and past the model's one set of slots).
FORWARDED = "x-legator-forwarded"
SETTINGS_KEY = "scheduler"
RATE_WINDOW_S = 10.0
REACH_TIMEOUT_S = 3.0  # for another replica's /healthz, before forwarding anything there
# The usage status of a request the server cancelled (its graceful shutdown period ran out):
# not the client's doing, which 499 would say.
CANCELLED = 503


class ForwardToReplica(Exception):
    """Another replica serves the model and takes forwarded requests: the app's handler for
    this (``gateway/forward.py``) passes the request on to it."""

    def __init__(self, model_id: str, replica: str, url: str) -> None:
        super().__init__(f"model {model_id!r} is served by replica {replica!r}")
        self.model_id, self.replica, self.url = model_id, replica, url


@dataclass
class Admission:
    """One admitted request: its model, backend and slot, and what it will be billed."""

    gateway: Gateway
    model: ModelOut
    category: str | None
    backend: Backend
    lease: Lease
    usage: UsageRecord
    started: float = field(default_factory=time.perf_counter)
    _done: bool = False

    def finish(self, status: int, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Release the slot and record the row; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self.lease.release()
        self.usage.status = status
        self.usage.input_tokens = max(0, int(input_tokens))
        self.usage.output_tokens = max(0, int(output_tokens))
        self.usage.latency_ms = int((time.perf_counter() - self.started) * 1000)
        self.usage.queued_ms = int(self.lease.queued_s * 1000)
        self.gateway.account(self.usage)


async def wait_for_slot(acquiring: Awaitable[Lease], request: Request) -> Lease:
    """Wait for a slot, leaving the queue if the client disconnects meanwhile."""
    slot: asyncio.Task[Lease] = asyncio.ensure_future(acquiring)
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({slot, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cancelled ourselves (a caller's time limit, shutdown): a slot granted meanwhile
        # is ours to give back, or it stays taken for good.
        if slot.done() and not slot.cancelled() and slot.exception() is None:
            slot.result().release()
        raise
    finally:
        if not slot.done():
            slot.cancel()  # the pool removes the waiter or passes a just-handed slot on
            await asyncio.gather(slot, return_exceptions=True)
        gone.cancel()
    if slot.cancelled():
        raise ClientGone
    return slot.result()


class Gateway:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.catalog = Catalog(core.db, core.audit)
        self.scheduler = Scheduler()
        self.backends = BackendRegistry()
        self.recorder = UsageRecorder(core.db)
        self.max_answer_bytes = core.settings.gateway_max_answer_bytes
        self.reservations = Reservations(core)
        self.rates: dict[str, deque[tuple[float, int]]] = {}
        self.catalog.listeners.append(self._on_model_change)
        self.metrics = GatewayMetrics(core.metrics.registry, self.scheduler, self.recorder)
        self.supervisor = Supervisor(core, self.catalog, self.scheduler, self.backends)
        self.downloads = Downloads(core, self.catalog, self.supervisor.root.parent / "models")
        backend_metrics.install(core.metrics.registry, self.supervisor, self.downloads)
        self.sync = (
            GatewaySync(core.cluster, self._reload, self._count_usage) if core.cluster else None
        )
        # With several replicas and a URL of ours: each external model is served by one of us.
        self.homes = (
            Homes(core.cluster, core.settings.replica_url, self._answers) if core.cluster else None
        )
        self.forwarding_token = hmac_sha256_hex(core.signing_key, "legator gateway forwarded|v1")
        if self.sync is not None:
            sync = self.sync
            self.catalog.written.append(lambda: sync.changed("catalog"))
            self.supervisor.written.append(lambda: sync.changed("catalog"))
            self.reservations.written.append(lambda: sync.changed("reservations"))
            self.recorder.on_written.append(lambda rows: sync.used(tokens_by_user(rows)))

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.catalog.load()
        await self.supervisor.reconcile()
        self.core.spawn(self.supervisor.monitor(), name="gateway-backend-monitor")
        await self.downloads.start()
        await self._load_settings()
        await self._seed_usage()
        await self.reservations.load()
        self.core.spawn(self.recorder.run(), name="gateway-usage-writer")
        if retention_days := self.core.settings.gateway_usage_retention_days:
            self.core.spawn(
                retention.keep_for("usage rows", retention_days, partial(prune, self.core.db)),
                name="gateway-usage-retention",
            )
        self.core.spawn(self.reservations.run(), name="gateway-reservations")
        if self.sync is not None:
            self.core.spawn(self.sync.run(), name="gateway-sync")
        if self.homes is not None:
            self.core.spawn(self.homes.run(), name="gateway-replica-beat")

    async def stop(self) -> None:
        if self.homes is not None:
            self.homes.leave()
            await self.homes.close()
        if self.sync is not None:
            await self.sync.close()
        await self.downloads.stop()
        await self.supervisor.shutdown()
        await self.recorder.close()
        await self.backends.close()

    async def _reload(self, part: Part) -> None:
        """Read again what another replica changed."""
        if part == "catalog":
            await self.catalog.reload()
            await self.supervisor.refresh_elsewhere()
        elif part == "settings":
            await self._apply_settings(await self.get_settings())
        elif part == "usage":
            await self._reseed_usage()
        else:
            await self.reservations.refresh_active()

    async def _load_settings(self) -> None:
        self.scheduler.config = SchedulerConfig(**(await self.get_settings()).model_dump())

    async def _apply_settings(self, settings: SchedulerSettings) -> None:
        config = SchedulerConfig(**settings.model_dump())
        grew = config.window_minutes > self.scheduler.config.window_minutes
        self.scheduler.config = config
        if grew:
            # The window kept nothing older than its old length: read that from the database.
            await self._reseed_usage()

    async def _seed_usage(self) -> None:
        self._fill_usage(await self._recent_usage())

    async def _recent_usage(self) -> list[tuple[str, float, int]]:
        """(user, when on the scheduler's clock, tokens) of every row in the window."""
        window = timedelta(minutes=self.scheduler.config.window_minutes)
        rows = await recent_tokens_by_user(self.core.db, window)
        now_wall = time.time()
        now_mono = self.scheduler.clock.now()
        return [(user, now_mono - (now_wall - ts.timestamp()), n) for user, ts, n in rows]

    def _fill_usage(self, entries: list[tuple[str, float, int]]) -> None:
        for user, at, tokens in entries:
            self.scheduler.usage.add(user, tokens, at=at)

    async def _reseed_usage(self) -> None:
        """Every replica's recent tokens, read again from the database: after a reconnection,
        announcements of them may have been lost. Nothing of this replica's is written
        meanwhile, so its rows are each either in the database or still pending; the window
        is swapped in one step after the read, so admissions never see it half full."""
        async with self.recorder.writing:
            entries = await self._recent_usage()
            self.scheduler.usage.clear()
            self._fill_usage(entries)
            for row in self.recorder.pending:
                if row.user_id:
                    self.scheduler.usage.add(row.user_id, row.input_tokens + row.output_tokens)

    def _count_usage(self, tokens_by_user: dict[str, int]) -> None:
        """Tokens another replica billed, for the fairness window."""
        for user, tokens in tokens_by_user.items():
            self.scheduler.usage.add(user, tokens)

    def _on_model_change(self, model: ModelOut | None, model_id: str) -> None:
        self.backends.forget(model_id)
        if model is None:
            self.scheduler.drop(model_id)
            if model_id in self.supervisor.live:  # deleted through another replica
                self.core.spawn(self.supervisor.model_gone(model_id), name="gateway-model-gone")
        elif model_id in self.scheduler.pools:
            self.scheduler.pool(model_id, model.parallel)

    # ----- settings ----------------------------------------------------------------------

    async def get_settings(self) -> SchedulerSettings:
        async with self.core.db.session() as session:
            row = await session.get(GatewaySetting, SETTINGS_KEY)
        return SchedulerSettings(**(row.value if row else {}))

    async def update_settings(
        self, changes: SchedulerSettingsUpdate, *, actor: str
    ) -> SchedulerSettings:
        updates = changes.model_dump(exclude_none=True)
        async with self.core.db.write() as session:
            row = await session.get(GatewaySetting, SETTINGS_KEY)
            merged = SchedulerSettings(**{**(row.value if row else {}), **updates})
            if row is None:
                session.add(GatewaySetting(key=SETTINGS_KEY, value=merged.model_dump()))
            else:
                row.value = merged.model_dump()
            await self.core.audit.record(
                session,
                actor=actor,
                action="gateway.settings.update",
                target="gateway:settings",
                details=updates,
            )
        await self._apply_settings(merged)
        if self.sync is not None:
            self.sync.changed("settings")
        return merged

    # ----- admission ---------------------------------------------------------------------

    async def admit(
        self,
        principal: Principal,
        requested: str | None,
        request: Request,
        *,
        endpoint: str,
        stream: bool,
    ) -> Admission:
        self.reservations.check(principal)
        resolved = self.catalog.resolve(principal, requested)
        model = resolved.model
        try:
            backend = self.backends.get(model)
        except LookupError as exc:
            raise ServiceUnavailable(str(exc)) from None
        if not backend.ready:
            other = self.supervisor.elsewhere.get(model.id)
            if other is not None and other.url and not self.forwarded(request):
                raise ForwardToReplica(model.id, other.replica, other.url)
            where = f" here: it runs on replica {other.replica!r}" if other else ""
            raise ServiceUnavailable(f"the backend of model {model.id!r} is not ready{where}")
        if (
            self.homes is not None
            and not model.managed
            and not self.forwarded(request)
            and (home := self.homes.home_of(model.id)) is not None
        ):
            raise ForwardToReplica(model.id, home.replica, home.url)
        usage = UsageRecord(
            user_id=principal.user_id,
            username=principal.username,
            key_id=principal.key_id,
            model_id=model.id,
            category=resolved.category,
            endpoint=endpoint,
            stream=stream,
        )
        user = principal.user_id or principal.username
        pool = self.scheduler.pool(model.id, model.parallel)
        try:
            lease = pool.try_acquire(user)
        except PoolClosed as exc:
            self._refused(usage, 503, time.perf_counter())
            raise ServiceUnavailable(str(exc)) from None
        if lease is None:
            lease, model, backend = await self._queue(
                pool, user, request, usage, principal, requested
            )
        return Admission(self, model, resolved.category, backend, lease, usage)

    async def _queue(
        self,
        pool: SlotPool,
        user: str,
        request: Request,
        usage: UsageRecord,
        principal: Principal,
        requested: str | None,
    ) -> tuple[Lease, ModelOut, Backend]:
        """A slot after waiting for it, with the model and backend as they are now. A request
        refused or given up meanwhile leaves a usage row too: those waited longest.

        A request that came through a category and whose model stopped serving while it
        waited (disabled, deleted, its backend down) waits once more, for another model of
        the category, within what is left of ``queue_timeout_s``."""
        started = time.perf_counter()
        rerouted = False
        while True:
            # A second wait has what is left of the first's limit.
            left = self.scheduler.config.queue_timeout_s - (time.perf_counter() - started)
            max_wait = max(left, 0.0) if rerouted else None
            try:
                lease = await wait_for_slot(pool.acquire(user, max_wait=max_wait), request)
            except (QueueFull, QueueTimeout) as exc:
                self._refused(usage, 429, started)
                headers = {"Retry-After": str(exc.retry_after)}
                raise TooManyRequests(str(exc), headers=headers) from None
            except ClientGone:
                self._refused(usage, 499, started)
                raise
            except asyncio.CancelledError:
                self._refused(usage, CANCELLED, started)
                raise
            except PoolClosed as exc:
                unserved = ServiceUnavailable(str(exc))
            else:
                try:
                    # A reservation that began while the request waited holds for it as well.
                    self.reservations.check(principal)
                except ServiceUnavailable:
                    lease.release()
                    self._refused(usage, 503, started)
                    raise
                try:
                    # So does an admin's change to the model (disabled, another backend).
                    model, backend = self._serving(usage.model_id)
                except ServiceUnavailable as exc:
                    lease.release()
                    unserved = exc
                else:
                    if rerouted:
                        lease.queued_s = time.perf_counter() - started
                    return lease, model, backend
            if rerouted or usage.category is None:
                self._refused(usage, 503, started)
                raise unserved
            rerouted = True
            try:
                model = self._instead(principal, requested, usage.model_id)
            except AppError as exc:
                self._refused(usage, exc.status_code, started)
                raise
            usage.model_id = model.id
            pool = self.scheduler.pool(model.id, model.parallel)

    def _instead(self, principal: Principal, requested: str | None, model_id: str) -> ModelOut:
        """The category's model that serves a request instead of ``model_id``, which stopped
        serving while the request waited: resolved again, as a new request would be."""
        model = self.catalog.resolve(principal, requested).model
        if model.id == model_id or self.served_by(model.id) is not None:
            raise ServiceUnavailable(f"model {model_id!r} stopped serving and no other is ready")
        self._serving(model.id)
        return model

    def _serving(self, model_id: str) -> tuple[ModelOut, Backend]:
        """The model as catalogued now and its backend, if both are ready to serve."""
        model = self.catalog.models.get(model_id)
        if model is None:
            raise ServiceUnavailable(f"model {model_id!r} was deleted")
        if model.state != "ready":
            raise ServiceUnavailable(f"model {model_id!r} is {model.state}, not ready")
        try:
            backend = self.backends.get(model)
        except LookupError as exc:
            raise ServiceUnavailable(str(exc)) from None
        if not backend.ready:
            raise ServiceUnavailable(f"the backend of model {model_id!r} is not ready")
        return model, backend

    def _refused(self, usage: UsageRecord, status: int, started: float) -> None:
        usage.status = status
        usage.latency_ms = usage.queued_ms = int((time.perf_counter() - started) * 1000)
        self.account(usage)

    def account(self, row: UsageRecord) -> None:
        tokens = row.input_tokens + row.output_tokens
        if row.user_id:
            self.scheduler.usage.add(row.user_id, tokens)
        now = time.monotonic()
        rate = self.rates.setdefault(row.model_id, deque())
        rate.append((now, row.output_tokens))
        while rate and rate[0][0] < now - RATE_WINDOW_S:
            rate.popleft()
        self.metrics.observe(row)
        self.recorder.record(row)

    def tokens_per_s(self, model_id: str) -> float:
        rate = self.rates.get(model_id)
        if not rate:
            return 0.0
        horizon = time.monotonic() - RATE_WINDOW_S
        return sum(n for t, n in rate if t >= horizon) / RATE_WINDOW_S

    async def _answers(self, url: str) -> bool:
        """Whether another replica's HTTP API answers at ``url`` from here."""
        try:
            async with self.backends.session.get(
                url + "/healthz",
                timeout=aiohttp.ClientTimeout(total=REACH_TIMEOUT_S),
                allow_redirects=False,
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def forwarded(self, request: Request) -> bool:
        """Whether another replica of this cluster forwarded ``request`` here."""
        value = request.headers.get(FORWARDED)
        return value is not None and constant_time_equal(value, self.forwarding_token)

    def served_by(self, model_id: str) -> str | None:
        """The replica that serves ``model_id`` when it is another one: this replica's slots
        and queue for the model then stay idle."""
        other = self.supervisor.elsewhere.get(model_id)
        if other is not None:
            return other.replica
        model = self.catalog.models.get(model_id)
        if self.homes is None or model is None or model.managed:
            return None
        home = self.homes.home_of(model_id)
        return home.replica if home is not None else None

    def snapshot(self, principal: Principal, *, admin: bool) -> dict[str, Any]:
        """Live state for the metrics stream; non-admins see only models they may use, and
        not which replica serves one (the cluster's layout is the operator's business)."""
        pools = self.scheduler.pools
        if admin:
            shown = set(self.catalog.models) | set(pools)
        else:
            shown = {m.id for m in self.catalog.visible(principal)}
        models = []
        # A model this replica has not served yet (one another replica serves, say) has no
        # pool: it is listed idle, with the catalogue's slots.
        for model_id in sorted(shown):
            pool = pools.get(model_id)
            replica = self.served_by(model_id)
            entry: dict[str, Any] = {"model": model_id}
            if pool is None:
                entry.update(slots=self.catalog.models[model_id].parallel, in_use=0)
                entry.update(queue_depth=0, oldest_wait_s=0.0, last_wait_s=0.0)
            else:
                entry.update(slots=pool.parallel, in_use=pool.in_use, queue_depth=pool.depth)
                entry["oldest_wait_s"] = round(pool.oldest_wait(), 3)
                entry["last_wait_s"] = round(pool.last_wait_s, 3)
            entry["tokens_per_s"] = round(self.tokens_per_s(model_id), 2)
            entry["served_elsewhere"] = replica is not None
            if admin:
                entry["served_by"] = replica
            models.append(entry)
        active = self.reservations.active
        reservation = None
        if active is not None:
            reservation = {"ends_at": active.ends_at.isoformat()}
            if admin or active.user_id == principal.user_id:
                reservation.update(id=active.id, username=active.username)
        return {"models": models, "reservation": reservation}
