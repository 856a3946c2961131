"""Managed backends: launch through a runtime, declare ready only once health answers 200,
watch them, and reconcile the database with what actually runs when the control plane starts.

State of one backend: ``starting → ready``; ``starting → failed`` (died or no health within
the start timeout); ``ready → failed`` (died or stopped answering); any → ``stopped``.
The model is ``ready`` in the catalogue (and has scheduler slots) exactly while its backend is.

With several replicas, a backend belongs to the replica that started it (its host and data
directory, which outlive a restart): the others never adopt, stop or fail it, and a start
elsewhere is refused while its owner keeps its row fresh (every LEASE_S / 3); once the owner
has been silent for LEASE_S, another replica may start the model itself.

A backend's port is picked free, but another process may take it before the backend binds it:
the backend is declared ready only while it holds its port itself (nothing else gets its key
or its requests), and one whose start failed because its port was taken is launched again on
another, PORT_TRIES ports in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, Field
from sqlalchemy import select, update

from legator.core.db.base import utcnow
from legator.core.errors import BadRequest, Conflict, ServiceUnavailable
from legator.core.logging import get_logger
from legator.core.runtime import Core
from legator.core.security import random_hex
from legator.gateway.backends import Backend, BackendRegistry, ExternalBackend
from legator.gateway.catalog import Catalog
from legator.gateway.models import GatewayRuntime
from legator.gateway.runtimes.base import Handle, Launch, PortTaken, Runtime, RuntimeError_
from legator.gateway.runtimes.podman import PodmanRuntime, podman_available
from legator.gateway.runtimes.process import ProcessRuntime
from legator.gateway.scheduler import Scheduler
from legator.gateway.schemas import ModelOut, ModelUpdate

log = get_logger("legator.gateway.supervisor")
SYSTEM = "system:gateway"
MONITOR_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 2.0
MISSES_TO_FAIL = 2  # consecutive failed health checks: 2 x (2 s + 2 s) stays under 10 s
ACTIVE = ("starting", "ready")
LEASE_S = 30.0
PORT_TRIES = 3  # a start gives up once this many of the ports it picked were taken meanwhile


class BackendStatus(BaseModel):
    model: str
    kind: str
    state: str
    port: int | None = None
    pid: int | None = None
    container: str | None = None
    error: str = ""
    started_at: str | None = None
    replica: str | None = Field(
        default=None, description="The replica that runs it, when several replicas share NATS."
    )


@dataclass(frozen=True)
class Elsewhere:
    """A backend another replica runs (its row, as last read)."""

    replica: str
    kind: str
    state: str
    started_at: datetime | None
    url: str | None  # the replica's LEGATOR_REPLICA_URL: where its /v1 is forwarded


@dataclass
class Live:
    model_id: str
    kind: str
    port: int
    api_key: str
    handle: Handle
    workdir: Path
    state: str = "starting"
    error: str = ""
    misses: int = 0
    failing: bool = False  # being stopped after a failure: no new requests
    started_at: Any = field(default_factory=utcnow)
    taken: list[int] = field(default_factory=list)  # ports another process took during its start

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ManagedBackend(Backend):
    """Requests go to the backend's loopback port with its per-backend key."""

    def __init__(self, model: ModelOut, live: Live | None) -> None:
        super().__init__(model)
        self.live = live

    @property
    def base_url(self) -> str:
        return (self.live.base_url if self.live else "http://127.0.0.1:0") + "/v1"

    @property
    def ready(self) -> bool:
        live = self.live
        return live is not None and live.state == "ready" and not live.failing and super().ready

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.live.api_key}"} if self.live else {}


def _elsewhere(row: GatewayRuntime) -> Elsewhere:
    return Elsewhere(
        replica=str(row.replica or row.owner),
        kind=row.kind,
        state=row.state,
        started_at=row.started_at,
        url=row.replica_url,
    )


def _free_port() -> int:
    # Free now, not reserved: another process may bind it before the backend does (see
    # Supervisor._launch and _answers).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ports_taken(ports: list[int]) -> str:
    listed = ", ".join(str(port) for port in ports)
    return (
        f"another process took the port picked for it before it could listen, {len(ports)}"
        f" times in a row (ports {listed}); giving up"
    )


class Supervisor:
    def __init__(
        self, core: Core, catalog: Catalog, scheduler: Scheduler, registry: BackendRegistry
    ) -> None:
        self.core = core
        self.catalog = catalog
        self.scheduler = scheduler
        self.registry = registry
        settings = core.settings
        self.start_timeout_s = settings.gateway_start_timeout_s
        base = settings.data_dir or Path(tempfile.mkdtemp(prefix="legator-backends-"))
        self.root = base / "gateway" / "backends"
        self.runtimes: dict[str, Runtime] = {
            "process": ProcessRuntime(settings.gateway_llama_server)
        }
        self.live: dict[str, Live] = {}
        # Stable across restarts and distinct per replica: what the rows of ours carry.
        self.owner = f"{socket.gethostname()}:{self.root}"
        self.replica = core.cluster.replica_id if core.cluster else None
        self.elsewhere: dict[str, Elsewhere] = {}  # model id -> backend another replica runs
        self.written: list[Callable[[], None]] = []  # called after each change of a row of ours
        self._reported = 0.0  # time.monotonic() of the last lease refresh
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        if podman_available():
            self.runtimes["podman"] = PodmanRuntime(
                settings.gateway_podman_image, settings.gateway_podman_flavour
            )
        for kind in self.runtimes:
            registry.factories[kind] = self._backend_for

    def add_runtime(self, runtime: Runtime) -> None:
        self.runtimes[runtime.kind] = runtime
        self.registry.factories[runtime.kind] = self._backend_for

    def _backend_for(self, model: ModelOut) -> Backend:
        if not model.managed:
            return ExternalBackend(model)
        return ManagedBackend(model, self.live.get(model.id))

    def runtime(self, kind: str) -> Runtime:
        runtime = self.runtimes.get(kind)
        if runtime is None:
            raise ServiceUnavailable(f"the {kind!r} runtime is not available on this host")
        return runtime

    # ----- status ----------------------------------------------------------------------------

    def status(self, model_id: str) -> BackendStatus:
        model = self.catalog.get_model(model_id)
        live = self.live.get(model_id)
        if live is None:
            other = self.elsewhere.get(model_id)
            if other is not None:
                return BackendStatus(
                    model=model_id,
                    kind=other.kind,
                    state=other.state,
                    started_at=other.started_at.isoformat() if other.started_at else None,
                    replica=other.replica,
                )
            return BackendStatus(model=model_id, kind=model.backend_kind, state="stopped")
        return BackendStatus(
            model=model_id,
            kind=live.kind,
            state=live.state,
            port=live.port,
            pid=live.handle.pid,
            container=live.handle.container,
            error=live.error,
            started_at=live.started_at.isoformat(),
            replica=self.replica,
        )

    async def _save(self, live: Live) -> None:
        async with self.core.db.write() as session:
            row = await session.get(GatewayRuntime, live.model_id)
            if row is None:
                row = GatewayRuntime(model_id=live.model_id, kind=live.kind)
                session.add(row)
            row.kind = live.kind
            row.owner, row.replica = self.owner, self.replica
            row.replica_url = self.core.settings.replica_url if self.replica else None
            row.state = live.state
            row.port = live.port
            row.pid = live.handle.pid
            row.pid_started = live.handle.pid_started
            row.container = live.handle.container
            row.error = live.error[:2000]
            row.started_at = live.started_at
        for hook in self.written:
            hook()

    async def _set_model_state(self, model_id: str, state: str) -> None:
        model = self.catalog.models.get(model_id)
        if model is None or model.state == state or model.state == "disabled":
            return
        await self.catalog.update_model(model_id, ModelUpdate(state=state), actor=SYSTEM)  # type: ignore[arg-type]

    async def _publish(self, live: Live, state: str) -> None:
        # No error detail: the core event stream goes to anyone with events:read, while the
        # error (paths, ports, the runtime's output) is for admins, at /backends and /logs.
        await self.core.events.publish(
            f"gateway.backend.{state}", {"model": live.model_id, "kind": live.kind, "state": state}
        )

    # ----- start / stop ----------------------------------------------------------------------

    async def start_backend(
        self, model_id: str, *, actor: str, wait: bool = False
    ) -> BackendStatus:
        model = self.catalog.get_model(model_id)
        if not model.managed:
            raise BadRequest(f"model {model_id!r} has an external backend; nothing to start")
        if model.state == "disabled":
            raise Conflict(f"model {model_id!r} is disabled")
        runtime = self.runtime(model.backend_kind)
        async with self._lock:
            current = self.live.get(model_id)
            if current is not None and current.state in ACTIVE:
                raise Conflict(f"the backend of {model_id!r} is already {current.state}")
            other = await self._held_elsewhere(model_id)
            if other is not None:
                raise Conflict(
                    f"the backend of {model_id!r} is {other.state} on replica {other.replica!r}:"
                    f" stop it through that replica (if that replica is gone, it can start here"
                    f" {LEASE_S:g} s after it last reported)"
                )
            if not await asyncio.to_thread(Path(model.model_path).is_file):
                raise BadRequest(f"model file {model.model_path} is missing")
            workdir = self.root / model_id
            workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            workdir.chmod(0o700)
            api_key = random_hex(32)
            taken: list[int] = []  # ports another process took before the backend bound them
            try:
                port, handle = await self._launch(runtime, model, api_key, workdir, taken)
            except RuntimeError_ as exc:
                raise ServiceUnavailable(f"could not start {model_id!r}: {exc}") from None
            if model_id not in self.catalog.models:
                # Deleted while it was being launched: forget_model found nothing to stop then,
                # and nothing would ever stop it later.
                await runtime.stop(handle, grace_s=0)
                raise Conflict(f"model {model_id!r} was deleted while its backend started")
            live = Live(model_id, model.backend_kind, port, api_key, handle, workdir, taken=taken)
            self.live[model_id] = live
            self.registry.forget(model_id)
            await self._save(live)
        await self.core.audit.log(
            actor=actor, action="gateway.backend.start", target=f"model:{model_id}"
        )
        await self._publish(live, "starting")
        task = asyncio.ensure_future(self._await_healthy(live, runtime))
        self._tasks[model_id] = task
        if wait:
            await asyncio.shield(task)
        return self.status(model_id)

    async def _launch(
        self, runtime: Runtime, model: ModelOut, api_key: str, workdir: Path, taken: list[int]
    ) -> tuple[int, Handle]:
        """Launch on a free port, and on another while the runtime finds it taken (Podman
        binds it at once); ``taken`` collects the ports lost, PORT_TRIES at most."""
        while True:
            port = _free_port()
            launch = Launch(
                model=model, port=port, api_key=api_key, workdir=workdir, owner=self.owner
            )
            try:
                return port, await runtime.start(launch)
            except PortTaken:
                taken.append(port)
                if len(taken) >= PORT_TRIES:
                    raise RuntimeError_(_ports_taken(taken)) from None
                log.warning("backend port taken; trying another", model=model.id, port=port)

    async def _relaunch(self, live: Live, runtime: Runtime) -> None:
        """The backend exited during its start because another process had taken its port:
        launch it again on another. RuntimeError_ once PORT_TRIES ports were lost."""
        live.taken.append(live.port)
        if len(live.taken) >= PORT_TRIES:
            raise RuntimeError_(_ports_taken(live.taken))
        model = self.catalog.models.get(live.model_id)
        if model is None:
            raise RuntimeError_("its model was deleted during its start")
        log.warning("backend port taken; starting it again", model=live.model_id, port=live.port)
        launching = asyncio.ensure_future(
            self._launch(runtime, model, live.api_key, live.workdir, live.taken)
        )
        try:
            live.port, live.handle = await asyncio.shield(launching)
        except asyncio.CancelledError:
            # Stopped meanwhile: the stop that cancelled this stops live.handle once this
            # returns, so it must be the backend just launched, not the one that exited.
            with contextlib.suppress(Exception):
                live.port, live.handle = await launching
            raise
        await self._save(live)

    async def _answers(self, live: Live, runtime: Runtime) -> bool:
        """Healthy, and the backend itself answers: a process that took its port is never
        sent its key (the health request carries it), nor declared ready in its place."""
        return await runtime.holds_port(live.handle, live.port) and await self._healthy(
            live, runtime
        )

    async def _healthy(self, live: Live, runtime: Runtime) -> bool:
        url = live.base_url + runtime.health_path
        headers = {"Authorization": f"Bearer {live.api_key}"}
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        try:
            async with self.registry.session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _await_healthy(self, live: Live, runtime: Runtime) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while live.state == "starting":
            if not await runtime.alive(live.handle):
                if not await runtime.port_taken(live.handle, live.workdir):
                    await self._fail(live, runtime, "exited during start-up; see its logs")
                    return
                try:
                    await self._relaunch(live, runtime)
                except RuntimeError_ as exc:
                    await self._fail(live, runtime, str(exc))
                    return
                deadline = loop.time() + self.start_timeout_s  # each launch has the timeout
                continue
            if await self._answers(live, runtime):
                await self._mark_ready(live)
                return
            if loop.time() >= deadline:
                await self._fail(
                    live, runtime, f"no healthy answer within {self.start_timeout_s:g} s"
                )
                return
            await asyncio.sleep(0.25)

    async def _mark_ready(self, live: Live) -> None:
        live.state, live.misses = "ready", 0
        await self._save(live)
        model = self.catalog.get_model(live.model_id)
        self.registry.forget(live.model_id)
        await self._set_model_state(live.model_id, "ready")
        self.scheduler.pool(model.id, model.parallel)
        await self._publish(live, "ready")
        log.info("backend ready", model=live.model_id, kind=live.kind, port=live.port)

    async def _fail(self, live: Live, runtime: Runtime, error: str) -> None:
        live.failing = True  # new requests get 503 at once
        self.scheduler.drop(live.model_id)  # queued requests get 503 now, not a hang
        # `failed` is reported only once the backend is gone, so that a start right after it
        # cannot meet the old container or process. It is dead or hung: no grace period.
        await runtime.stop(live.handle, grace_s=0)
        if live.state == "stopped":  # stopped meanwhile: that stop has done the rest
            return
        live.state, live.error = "failed", error
        await self._save(live)
        await self._set_model_state(live.model_id, "unavailable")
        self.registry.forget(live.model_id)
        await self._publish(live, "failed")
        log.warning("backend failed", model=live.model_id, error=error)

    async def stop_backend(self, model_id: str, *, actor: str) -> BackendStatus:
        self.catalog.get_model(model_id)
        async with self._lock:  # a start under way has launched and registered it by then
            live = self.live.get(model_id)
        if live is None or live.state == "stopped":
            other = await self._held_elsewhere(model_id)
            if other is not None:
                raise Conflict(
                    f"the backend of {model_id!r} runs on replica {other.replica!r}:"
                    " stop it through that replica"
                )
            raise Conflict(f"the backend of {model_id!r} is not running")
        await self._stop(live)
        await self.core.audit.log(
            actor=actor, action="gateway.backend.stop", target=f"model:{model_id}"
        )
        return self.status(model_id)

    async def _stop(self, live: Live) -> None:
        task = self._tasks.pop(live.model_id, None)
        previous = live.state
        live.state = "stopped"
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.scheduler.drop(live.model_id)
        runtime = self.runtimes.get(live.kind)
        if runtime is not None:
            await runtime.stop(live.handle)
        await self._save(live)
        await self._set_model_state(live.model_id, "unavailable")
        self.registry.forget(live.model_id)
        if previous != "stopped":
            await self._publish(live, "stopped")

    async def logs(self, model_id: str, tail: int) -> str:
        model = self.catalog.get_model(model_id)
        live = self.live.get(model_id)
        runtime = self.runtime(model.backend_kind)
        handle = live.handle if live else Handle(container=None)
        return await runtime.logs(handle, self.root / model_id, tail)

    async def forget_model(self, model_id: str) -> None:
        """Before a model is deleted: stop its backend and drop its files."""
        live = self.live.pop(model_id, None)
        if live is not None and live.state != "stopped":
            await self._stop(live)
        async with self.core.db.write() as session:
            row = await session.get(GatewayRuntime, model_id)
            if row is not None:
                await session.delete(row)
        # Its server.log may be large: unlinking it can take a while, not on the loop.
        await asyncio.to_thread(shutil.rmtree, self.root / model_id, ignore_errors=True)

    # ----- monitor ---------------------------------------------------------------------------

    async def monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                await self._report()
            except Exception:
                log.exception("refreshing the backends' lease failed")
            for live in list(self.live.values()):
                if live.state != "ready":
                    continue
                try:
                    await self._check(live)
                except Exception:  # one backend's trouble must not stop the monitor
                    log.exception("backend check failed", model=live.model_id)

    async def _check(self, live: Live) -> None:
        runtime = self.runtimes[live.kind]
        if not await runtime.alive(live.handle):
            await self._fail(live, runtime, "the backend exited")
            return
        await runtime.trim_logs(live.workdir)
        if await self._healthy(live, runtime):
            live.misses = 0
            return
        live.misses += 1
        if live.misses >= MISSES_TO_FAIL and live.state == "ready":
            await self._fail(live, runtime, f"no health answer {live.misses} times in a row")

    # ----- reconciliation --------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Adopt what still runs and answers; stop and mark failed what does not; remove
        orphans; no managed model is ready without a live backend. Another replica's
        backends are left to it."""
        async with self.core.db.session() as session:
            rows = (await session.scalars(select(GatewayRuntime))).all()
        known: set[str] = set()
        for row in rows:
            model = self.catalog.models.get(row.model_id)
            runtime = self.runtimes.get(row.kind)
            handle = Handle(pid=row.pid, pid_started=row.pid_started, container=row.container)
            if row.state not in ACTIVE or runtime is None or model is None or not self._mine(row):
                continue
            live = Live(
                row.model_id,
                row.kind,
                row.port or 0,
                self._read_key(row.model_id),
                handle,
                self.root / row.model_id,
                state="starting",
                started_at=row.started_at or utcnow(),
            )
            alive = bool(live.api_key) and await runtime.alive(handle)
            if alive and await self._answers(live, runtime):
                known.add(row.container or str(row.pid))
                self.live[row.model_id] = live
                await self._mark_ready(live)
                log.info("adopted running backend", model=row.model_id)
            elif row.owner is None and self.replica is not None:
                continue  # recorded before owners were: perhaps another replica's
            elif alive:
                known.add(row.container or str(row.pid))
                self.live[row.model_id] = live
                await self._adopt_unhealthy(live, runtime)
            else:
                known.add(row.container or str(row.pid))
                self.live[row.model_id] = live
                await self._fail(live, runtime, "not running after a control-plane restart")
        for runtime in self.runtimes.values():
            for orphan in await runtime.orphans(known, self.owner):
                log.warning("removing orphan backend", container=orphan.container, pid=orphan.pid)
                await runtime.stop(orphan)
        await self.refresh_elsewhere()
        for model in list(self.catalog.models.values()):
            if model.managed and model.id not in self.live and model.id not in self.elsewhere:
                await self._set_model_state(model.id, "unavailable")
                self.scheduler.drop(model.id)

    async def _adopt_unhealthy(self, live: Live, runtime: Runtime) -> None:
        """Running but not answering: still loading its model (the control plane restarted
        during a start) or slow this once. It gets the start timeout, as at a start."""
        await self._save(live)
        await self._set_model_state(live.model_id, "unavailable")
        self._tasks[live.model_id] = asyncio.ensure_future(self._await_healthy(live, runtime))
        log.info("adopted running backend; waiting for its health", model=live.model_id)

    # ----- several replicas ------------------------------------------------------------------

    def _mine(self, row: GatewayRuntime) -> bool:
        return self.replica is None or row.owner in (None, self.owner)

    def _others(self) -> Any:
        """Rows of backends that another replica runs and still reports on."""
        return select(GatewayRuntime).where(
            GatewayRuntime.owner.is_not(None),
            GatewayRuntime.owner != self.owner,
            GatewayRuntime.state.in_(ACTIVE),
            GatewayRuntime.updated_at > utcnow() - timedelta(seconds=LEASE_S),
        )

    async def refresh_elsewhere(self) -> None:
        """Read which backends other replicas run (after the catalogue changed)."""
        if self.replica is None:
            return
        async with self.core.db.session() as session:
            rows = (await session.scalars(self._others())).all()
        self.elsewhere = {row.model_id: _elsewhere(row) for row in rows}

    async def _held_elsewhere(self, model_id: str) -> Elsewhere | None:
        if self.replica is None:
            return None
        async with self.core.db.session() as session:
            row = await session.scalar(self._others().where(GatewayRuntime.model_id == model_id))
        if row is None:
            self.elsewhere.pop(model_id, None)
            return None
        self.elsewhere[model_id] = other = _elsewhere(row)
        return other

    async def _report(self) -> None:
        """Keep the rows of our running backends fresh: their lease (LEASE_S)."""
        if self.replica is None or not self.live:
            return
        if time.monotonic() - self._reported < LEASE_S / 3:
            return
        self._reported = time.monotonic()
        async with self.core.db.write() as session:
            await session.execute(
                update(GatewayRuntime)
                .where(
                    GatewayRuntime.owner == self.owner,
                    GatewayRuntime.state.in_(ACTIVE),
                    GatewayRuntime.model_id.in_(list(self.live)),
                )
                .values(updated_at=utcnow())
            )

    async def model_gone(self, model_id: str) -> None:
        """The model was deleted (perhaps through another replica): stop its backend here."""
        if model_id in self.live:
            await self.forget_model(model_id)

    def _read_key(self, model_id: str) -> str:
        workdir = self.root / model_id
        key_file = workdir / "api_key"
        if key_file.is_file():
            return key_file.read_text().strip()
        config = workdir / "server.json"
        if config.is_file():
            import json

            return str(json.loads(config.read_text()).get("api_key", ""))
        return ""

    async def shutdown(self) -> None:
        """Stop every managed backend: none outlives a clean control-plane stop. All at once:
        N backends slow to stop hold it up for one grace period, not N."""

        async def stop(live: Live) -> None:
            try:
                await self._stop(live)
            except Exception:
                log.exception("backend stop failed", model=live.model_id)

        await asyncio.gather(
            *(stop(live) for live in list(self.live.values()) if live.state != "stopped")
        )
