"""The one path by which anything runs on a host.

``CommandService.run`` (one probe) and ``fan_out`` (a tag) put every request through the gate
(classification, each target's policy and approval mode); an allowed request is executed at
once, a queued one waits in the approval queue and is executed by ``_run_approved`` when
approved. ``_record_and_send`` records the command and sends it signed; nothing else sends
commands (a test walks the code to check).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.audit.service import AuditService
from legator.core.auth.principal import Principal
from legator.core.context import current_request_id
from legator.core.db import Database, new_id, retention, utcnow
from legator.core.errors import AppError, Forbidden, NotFound
from legator.core.events import InMemoryEventBus
from legator.core.logging import get_logger
from legator.fleet.approvals.schemas import ApprovalMode, ApprovalOut
from legator.fleet.approvals.service import approvals_short
from legator.fleet.batching import GroupCommitter
from legator.fleet.gate import Action, Gate, GateResult, Target
from legator.fleet.hub import Hub, ProbeNotConnected
from legator.fleet.metrics import FleetMetrics
from legator.fleet.models import Command, CommandChunk, Probe
from legator.fleet.policies import PolicyService
from legator.fleet.policy import Decision, evaluate, weakest
from legator.fleet.policy import Policy as LevelPolicy
from legator.fleet.protocol import (
    OUTPUT_CAP,
    T_COMMAND,
    CommandResult,
    CommandSpec,
    OutputChunk,
)
from legator.fleet.schemas import CommandMode, CommandOut, CommandRequest, FanOutItem, FanOutResult

log = get_logger("legator.fleet.commands")
KIND_COMMAND = "fleet.command"
RECONNECT_WAIT_S = 30.0
ACTIVE = ("dispatched", "running")
# A result is taken for these only: a lost command's (its deadline passed) may still come.
RESULT_AWAITED = (*ACTIVE, "lost")
RESULT_BATCH = 1000
# A follower of /commands/{id}/stream holds at most this many live items; one that falls
# further behind is switched to reading the rest from the database (nothing is lost).
FOLLOWER_QUEUE = 256
# Finished commands remembered here, so that late output for them costs no database read.
CLOSED_MEMORY = 10_000
_END = object()
_BEHIND = object()
_COMMANDS = Command.__table__
_CHUNKS = CommandChunk.__table__
# Each command deleted takes its output chunks with it: fewer per transaction than usage rows.
PRUNE_BATCH = 500


async def prune_commands(db: Database, before: datetime, *, batch: int = PRUNE_BATCH) -> int:
    """Delete the commands created before ``before``, with their output, once finished (or
    past their deadline); returns how many went."""
    ended = or_(Command.finished_at.is_not(None), Command.deadline_at < before)
    return await retention.prune(
        db, Command.id, Command.created_at, before, batch=batch, also=ended
    )


# Core statements on the hot path: the ORM's unit of work, row loading and bulk UPDATE cost
# more than the writes themselves.
_INSERT_COMMAND = insert(_COMMANDS)
_RESULT_OWNERS = select(_COMMANDS.c.id, _COMMANDS.c.probe_id, _COMMANDS.c.status).where(
    _COMMANDS.c.id.in_(bindparam("ids", expanding=True))
)
_STORE_RESULT = update(_COMMANDS).where(_COMMANDS.c.id == bindparam("command_id"))
_INSERT_CHUNK = insert(_CHUNKS)
_MARK_RUNNING = (
    update(_COMMANDS)
    .where(_COMMANDS.c.id == bindparam("command_id"), _COMMANDS.c.status == "dispatched")
    .values(status="running")
)
_MARK_TRUNCATED = (
    update(_COMMANDS).where(_COMMANDS.c.id == bindparam("command_id")).values(truncated=True)
)
_OUTPUT_OWNER = select(_COMMANDS.c.status, _COMMANDS.c.deadline_at).where(
    _COMMANDS.c.id == bindparam("command_id"), _COMMANDS.c.probe_id == bindparam("probe_id")
)
_OUTPUT_STORED = (
    select(_CHUNKS.c.stream, func.sum(func.length(_CHUNKS.c.data)), func.max(_CHUNKS.c.seq))
    .where(_CHUNKS.c.command_id == bindparam("command_id"))
    .group_by(_CHUNKS.c.stream)
)


class _Output:
    """What this replica knows of an active command's output: whose it is, and what has
    been stored of it (in characters, per stream), so a chunk is checked in memory."""

    __slots__ = ("deadline", "last_seq", "probe_id", "running", "truncated", "used")

    def __init__(
        self,
        probe_id: str,
        deadline: float,
        *,
        running: bool = False,
        last_seq: int = -1,
        used: dict[str, int] | None = None,
    ) -> None:
        self.probe_id = probe_id
        self.deadline = deadline  # time.monotonic(); past it the command is (about to be) lost
        self.running = running
        self.last_seq = last_seq
        self.used = used if used is not None else {"stdout": 0, "stderr": 0}
        self.truncated = False


def _offer(queue: asyncio.Queue[Any], item: Any) -> None:
    """Hand ``item`` to a stream follower without ever growing its queue past its bound: a
    follower that stopped reading has its backlog dropped and re-reads it from the database
    (chunks are stored before they are offered)."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_BEHIND)
        if item is _END:
            queue.put_nowait(_END)


class CommandService:
    def __init__(
        self,
        db: Database,
        audit: AuditService,
        events: InMemoryEventBus,
        hub: Hub,
        policies: PolicyService,
        metrics: FleetMetrics,
        gate: Gate,
        *,
        grace_s: float,
    ) -> None:
        self.db = db
        self.gate = gate
        gate.approvals.register_dispatcher(KIND_COMMAND, self._run_approved)
        self.audit = audit
        self.events = events
        self.hub = hub
        self.policies = policies
        self.metrics = metrics
        self.grace_s = grace_s
        self._started: dict[str, float] = {}
        self._active: dict[str, _Output] = {}  # commands whose output may still arrive
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently finished ones
        self._streams: dict[str, set[asyncio.Queue[Any]]] = defaultdict(set)
        self.writer = GroupCommitter(db)
        self._results: list[tuple[str, CommandResult, asyncio.Future[bool]]] = []
        self._results_wake = asyncio.Event()
        self._results_task: asyncio.Task[None] | None = None
        hub.remote_reply_hooks.append(self._finished_elsewhere)

    async def effective_policy(self, probe: Probe) -> tuple[LevelPolicy, str]:
        policy = await self.policies.get(probe.policy_id)
        level = weakest(policy.level, probe.max_level or "remediate")
        return (
            LevelPolicy(
                level=level,
                allow=tuple(policy.allow),
                block=tuple(policy.block),
                paths=tuple(policy.paths),
            ),
            policy.name,
        )

    async def target(self, probe: Probe) -> Target:
        policy, name = await self.effective_policy(probe)
        mode = (await self.policies.get(probe.policy_id)).approval_mode
        return Target(probe.id, name, policy, ApprovalMode(mode))

    async def _probe(self, probe_id: str) -> Probe:
        async with self.db.session() as session:
            probe = await session.get(Probe, probe_id)
        if probe is None:
            raise NotFound(f"no probe with id {probe_id}")
        return probe

    # ---- through the gate ------------------------------------------------------------------

    async def run(
        self,
        *,
        principal: Principal,
        probe_id: str,
        request: CommandRequest,
        mode: CommandMode,
        origin: str = "rest",
        reason: str = "",
    ) -> tuple[GateResult, Command | None]:
        """Gate, then execute: the command row when allowed, None when queued for approval.
        A denial raises Forbidden carrying the rationale."""
        probe = await self._probe(probe_id)
        action = Action(
            kind=KIND_COMMAND,
            origin=origin,
            command=request.command,
            args=tuple(request.args),
            shell=request.shell,
            level=request.level,
            payload={"request": request.model_dump(mode="json")},
            reason=reason,
        )
        verdict = await self.gate.check(
            action, [await self.target(probe)], principal, record_allow=False
        )
        if verdict.decision == "deny":
            self.metrics.commands.labels("refused_by_policy").inc()
            raise Forbidden(
                f"refused: {verdict.rationale['denied'].get(probe_id, 'policy')}",
                details=verdict.rationale,
                headers=verdict.headers,
            )
        if verdict.decision == "queue":
            return verdict, None
        return verdict, await self._record_and_send(
            actor=principal.actor,
            probe_id=probe_id,
            request=request,
            mode=mode,
            probe=probe,
            decision_audit=verdict.decision_audit,
        )

    async def _run_approved(self, approval: ApprovalOut, payload: dict[str, Any]) -> dict[str, Any]:
        """Approval dispatcher: run an approved single command or fan-out, once, on each of
        its targets (waiting a little for probes that are reconnecting after a restart)."""
        request = CommandRequest.model_validate(payload["request"])
        started: dict[str, str] = {}
        errors: dict[str, str] = {}
        for probe_id in approval.targets:
            try:
                mode = (await self.target(await self._probe(probe_id))).approval_mode
            except AppError as exc:
                errors[probe_id] = exc.message
                continue
            short = approvals_short(approval, mode)
            if short:
                errors[probe_id] = short
                continue
            await self._wait_connected(probe_id, RECONNECT_WAIT_S)
            try:
                row = await self._record_and_send(
                    actor=approval.requester, probe_id=probe_id, request=request, mode="dispatch"
                )
                started[probe_id] = row.id
            except AppError as exc:
                errors[probe_id] = exc.message
        return {"request_ids": started, "errors": errors}

    async def _wait_connected(self, probe_id: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        with self.events.subscribe("probe.connected") as connected:
            while not self.hub.is_connected(probe_id):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                await connected.get(wait=remaining)

    async def _record_and_send(
        self,
        *,
        actor: str,
        probe_id: str,
        request: CommandRequest,
        mode: CommandMode,
        probe: Probe | None = None,
        decision_audit: dict[str, Any] | None = None,
        checked: dict[LevelPolicy, Decision] | None = None,
    ) -> Command:
        """Record and send (only after the gate). ``wait`` returns once the result is in (or
        the command's timeout passed); the other modes return at once. The policy is checked
        again here: an approval may be decided after the probe's policy was tightened.
        ``decision_audit``, the gate's unwritten "allow", is recorded with the dispatch (or
        on its own when the dispatch does not happen). ``checked`` holds the decisions already
        taken on this request by policy, for the probes of one fan-out that share one."""
        pending_audit = [decision_audit] if decision_audit else []
        request_id = current_request_id()  # the group commit runs in another task
        if probe is None or probe.id != probe_id:  # callers may pass the row they hold
            probe = await self._probe(probe_id)
        policy, policy_name = await self.effective_policy(probe)
        decision = checked.get(policy) if checked is not None else None
        if decision is None:
            decision = evaluate(
                policy,
                request.command,
                request.args,
                shell=request.shell,
                requested=request.level,
                env=request.env,
            )
            if checked is not None:
                checked[policy] = decision
        details = {
            "command": request.command,
            "args": request.args,
            "shell": request.shell,
            "level": decision.required,
            "policy": policy_name,
            "mode": mode,
        }
        if not decision.allowed:
            self.metrics.commands.labels("refused_by_policy").inc()
            refused = {
                "actor": actor,
                "action": "fleet.command.refused",
                "target": probe_id,
                "outcome": "denied",
                "details": {**details, "reason": decision.reason},
                "request_id": request_id,
            }
            await self._audit_now([*pending_audit, refused])
            raise Forbidden(
                f"refused by policy {policy_name!r} on {probe_id}: {decision.reason}",
                details={"required_level": decision.required, "policy_level": policy.level},
            )
        if not self.hub.is_connected(probe_id):
            await self._audit_now(pending_audit)
            raise self.hub.not_connected(probe_id)
        now = utcnow()
        command = Command(
            id=new_id(),
            probe_id=probe_id,
            command=request.command,
            args=request.args,
            shell=request.shell,
            level=decision.required,
            timeout_s=request.timeout_s,
            mode=mode,
            status="dispatched",
            requested_by=actor,
            stdout="",
            stderr="",
            truncated=False,
            created_at=now,
            deadline_at=now + timedelta(seconds=request.timeout_s + self.grace_s),
        )
        command_row = {c.name: getattr(command, c.key) for c in _COMMANDS.columns}

        async def record(session: AsyncSession) -> None:
            for fields in pending_audit:
                await self.audit.record(session, **fields)
            await (await session.connection()).execute(_INSERT_COMMAND, command_row)
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.command.dispatch",
                target=probe_id,
                details={**details, "request_id": command.id},
                request_id=request_id,
            )

        await self.writer.run(record)
        spec = CommandSpec(
            request_id=command.id,
            command=request.command,
            args=request.args,
            shell=request.shell,
            timeout_s=request.timeout_s,
            level=decision.required,  # type: ignore[arg-type]
            env=request.env,
            stream=mode == "stream",
        )
        waiter = self.hub.expect(command.id) if mode == "wait" else None
        self._started[command.id] = time.monotonic()
        self._active[command.id] = _Output(
            probe_id, time.monotonic() + request.timeout_s + self.grace_s
        )
        try:
            await self.hub.send(probe_id, T_COMMAND, spec)
        except ProbeNotConnected as exc:
            self.hub.forget(command.id)
            await self._finish(
                command.id,
                probe_id,
                CommandResult(request_id=command.id, status="error", error=exc.message),
            )
            raise
        if waiter is None:
            return command
        try:
            result: CommandResult | None = await asyncio.wait_for(
                waiter, request.timeout_s + self.grace_s
            )
        except TimeoutError:
            return await self.get(command.id)
        finally:
            self.hub.forget(command.id)
        if result is None:  # finished on another replica, which stored it (follow_finishes)
            return await self.get(command.id)
        # The stored row now holds exactly this result; no need to read it back.
        command.status, command.exit_code = result.status, result.exit_code
        command.stdout, command.stderr = result.stdout, result.stderr
        command.truncated, command.duration_ms = result.truncated, result.duration_ms
        command.error, command.finished_at = result.error or result.reason, utcnow()
        return command

    async def _audit_now(self, events: list[dict[str, Any]]) -> None:
        if events:
            async with self.db.write() as session:
                for fields in events:
                    await self.audit.record(session, **fields)

    async def fan_out(
        self,
        *,
        principal: Principal,
        tag: str,
        request: CommandRequest,
        probes: list[Probe],
        origin: str = "fanout",
        reason: str = "",
    ) -> tuple[GateResult, FanOutResult]:
        """One gate decision for the whole group: refused targets are reported, and a queued
        fan-out is one approval listing every target."""
        action = Action(
            kind=KIND_COMMAND,
            origin=origin,
            command=request.command,
            args=tuple(request.args),
            shell=request.shell,
            level=request.level,
            payload={"request": request.model_dump(mode="json"), "tag": tag},
            reason=reason,
        )
        targets = [await self.target(probe) for probe in probes]
        verdict = await self.gate.check(action, targets, principal)
        by_id = {probe.id: probe for probe in probes}
        refused = [
            FanOutItem(probe_id=probe_id, hostname=by_id[probe_id].hostname, ok=False, error=why)
            for probe_id, why in verdict.rationale["denied"].items()
        ]
        outcome = FanOutResult(
            tag=tag,
            targets=len(probes),
            results=refused,
            decision=verdict.decision,
            approval_id=verdict.approval.id if verdict.approval else None,
            rationale=verdict.rationale,
        )
        if verdict.decision != "allow":
            return verdict, outcome
        allowed = [by_id[probe_id] for probe_id in verdict.allowed_targets]
        checked: dict[LevelPolicy, Decision] = {}  # one evaluation per distinct policy

        async def one(probe: Probe) -> FanOutItem:
            try:
                result = await self._record_and_send(
                    actor=principal.actor,
                    probe_id=probe.id,
                    request=request,
                    mode="wait",
                    probe=probe,
                    checked=checked,
                )
            except AppError as exc:
                return FanOutItem(
                    probe_id=probe.id, hostname=probe.hostname, ok=False, error=exc.message
                )
            out = CommandOut.model_validate(result, from_attributes=True)
            return FanOutItem(
                probe_id=probe.id,
                hostname=probe.hostname,
                ok=result.status == "completed",
                result=out,
            )

        outcome.results += list(await asyncio.gather(*(one(p) for p in allowed)))
        return verdict, outcome

    # ---- from the probe ----------------------------------------------------------------

    async def on_result(self, probe_id: str, result: CommandResult) -> None:
        if result.request_id is None:
            log.warning(
                "probe refused a message",
                probe_id=probe_id,
                reason=result.reason,
                error=result.error,
            )
            await self.events.publish(
                "probe.rejected",
                {"probe_id": probe_id, "reason": result.reason, "error": result.error},
            )
            return
        await self._finish(result.request_id, probe_id, result)

    async def _finish(self, request_id: str, probe_id: str, result: CommandResult) -> None:
        if not await self._store(probe_id, result):
            return
        started = self._started.pop(request_id, None)
        if started is not None:
            self.metrics.latency.observe(time.monotonic() - started)
        self._close_output(request_id)
        self.metrics.commands.labels(result.status).inc()
        self.hub.resolve(request_id, result)
        for queue in self._streams.get(request_id, ()):
            _offer(queue, _END)
        self.hub.relay_output(request_id, None)
        await self.events.publish(
            "command.finished",
            {
                "request_id": request_id,
                "probe_id": probe_id,
                "status": result.status,
                "exit_code": result.exit_code,
            },
        )

    async def follow_finishes(self) -> None:
        """With several replicas: a probe that reconnects to another replica mid-command
        delivers its result there, which stores it and publishes ``command.finished``; that
        event, not a reply, wakes a ``?wait=true`` request still waiting here."""
        with self.events.subscribe("command.finished") as finished:
            async for event in finished:
                request_id = event.data.get("request_id")
                if isinstance(request_id, str):
                    # A command finished here resolved its waiter before publishing: no-op.
                    self.hub.resolve(request_id, None, forward=False)
                    self._close_output(request_id)

    def _finished_elsewhere(self, request_id: str, result: Any) -> None:
        """A command sent from here finished on the replica holding its probe (which stored
        it): the time it took is measured here, where it started."""
        started = self._started.pop(request_id, None)
        if started is not None and isinstance(result, CommandResult):
            self.metrics.latency.observe(time.monotonic() - started)
        if isinstance(result, CommandResult):
            self._close_output(request_id)

    async def _store(self, probe_id: str, result: CommandResult) -> bool:
        """Queue a result for the next batch write; True once it is stored."""
        if self._results_task is None or self._results_task.done():
            self._results_task = asyncio.create_task(self._results_loop(), name="fleet-results")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._results.append((probe_id, result, future))
        self._results_wake.set()
        return await future

    async def _results_loop(self) -> None:
        # Results are written in batches: one SELECT and one executemany UPDATE per batch
        # instead of an ORM load and an UPDATE per command (a fan-out returns thousands).
        while True:
            await self._results_wake.wait()
            self._results_wake.clear()
            while self._results:
                batch, self._results = self._results[:RESULT_BATCH], self._results[RESULT_BATCH:]
                try:
                    stored = await self._store_batch(batch)
                except Exception as exc:
                    log.exception("storing command results failed")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), ok in zip(batch, stored, strict=True):
                    if not future.done():
                        future.set_result(ok)

    async def _store_batch(
        self, batch: list[tuple[str, CommandResult, asyncio.Future[bool]]]
    ) -> list[bool]:
        ids = [result.request_id for _, result, _ in batch]
        now = utcnow()
        stored: list[bool] = []
        updates: list[dict[str, Any]] = []
        async with self.db.write() as session:
            connection = await session.connection()
            rows = await connection.execute(_RESULT_OWNERS, {"ids": ids})
            found = {row.id: (row.probe_id, row.status) for row in rows}
            for probe_id, result, _ in batch:
                known = found.get(result.request_id or "")
                if known is None or known[0] != probe_id:
                    log.warning(
                        "result for an unknown command",
                        probe_id=probe_id,
                        request_id=result.request_id,
                    )
                    stored.append(False)
                    continue
                if result.status in ("refused", "rejected"):
                    await self.audit.record(
                        session,
                        actor=f"probe:{probe_id}",
                        action="fleet.command.refused_by_probe",
                        target=probe_id,
                        outcome="denied",
                        details={
                            "request_id": result.request_id,
                            "reason": result.reason,
                            "error": result.error,
                        },
                        request_id="",  # from the probe's socket, not an HTTP request
                    )
                if known[1] not in RESULT_AWAITED:
                    # A replayed message, or a probe (say, a compromised host) rewriting what
                    # one of its finished commands found: the first result stands.
                    log.warning(
                        "result for a finished command ignored",
                        probe_id=probe_id,
                        request_id=result.request_id,
                        status=known[1],
                    )
                    stored.append(False)
                    continue
                found[result.request_id or ""] = (probe_id, result.status)
                output = self._active.get(result.request_id or "")
                updates.append(
                    {
                        "command_id": result.request_id,
                        "status": result.status,
                        "exit_code": result.exit_code,
                        "stdout": result.stdout,
                        "stderr": result.stderr,
                        "truncated": result.truncated or (output is not None and output.truncated),
                        "duration_ms": result.duration_ms,
                        "error": result.error or result.reason,
                        "finished_at": now,
                    }
                )
                stored.append(True)
            if updates:
                await connection.execute(_STORE_RESULT, updates)
        return stored

    async def on_chunk(self, probe_id: str, chunk: OutputChunk) -> None:
        """Store and relay a chunk of a command's output: only while the command is active,
        only from its own probe, in increasing ``seq``, and up to ``OUTPUT_CAP`` characters
        per stream (what is over is dropped and the command marked truncated). All of it
        is checked in memory; the database is read once per command at most (for commands
        this replica did not dispatch, or after a restart)."""
        request_id = chunk.request_id
        output = self._active.get(request_id)
        if output is None:
            if request_id in self._closed:
                return
            output = await self._load_output(probe_id, request_id)
            if output is None:
                return
        if output.probe_id != probe_id or chunk.seq <= output.last_seq:
            return
        room = OUTPUT_CAP - output.used[chunk.stream]
        if room <= 0 and output.truncated:
            return
        output.last_seq = chunk.seq
        data = chunk.data
        cut = len(data) > room
        if cut:
            data = data[: max(room, 0)]
            chunk = OutputChunk.model_construct(
                request_id=request_id, seq=chunk.seq, stream=chunk.stream, data=data
            )
        output.used[chunk.stream] += len(data)
        mark_running = not output.running
        mark_truncated = cut and not output.truncated
        output.running = True
        output.truncated = output.truncated or cut
        if cut:
            log.warning(
                "command output over the cap dropped",
                probe_id=probe_id,
                request_id=request_id,
                stream=chunk.stream,
                cap=OUTPUT_CAP,
            )
        row = {"command_id": request_id, "seq": chunk.seq, "stream": chunk.stream, "data": data}

        async def store(session: AsyncSession) -> None:
            connection = await session.connection()
            if data:
                await connection.execute(_INSERT_CHUNK, row)
            if mark_running:
                await connection.execute(_MARK_RUNNING, {"command_id": request_id})
            if mark_truncated:
                await connection.execute(_MARK_TRUNCATED, {"command_id": request_id})

        await self.writer.run(store)
        if not data:
            return
        for queue in self._streams.get(request_id, ()):
            _offer(queue, chunk)
        self.hub.relay_output(request_id, chunk)

    async def _load_output(self, probe_id: str, request_id: str) -> _Output | None:
        """The output state of a command this replica does not know yet, from the database:
        None unless it is ``probe_id``'s and active."""
        async with self.db.session() as session:
            connection = await session.connection()
            owner = (
                await connection.execute(
                    _OUTPUT_OWNER, {"command_id": request_id, "probe_id": probe_id}
                )
            ).first()
            if owner is None:
                return None  # unknown, or another probe's: nothing to remember
            if owner.status not in ACTIVE:
                self._remember_closed(request_id)
                return None
            stored = (await connection.execute(_OUTPUT_STORED, {"command_id": request_id})).all()
        left_s = (owner.deadline_at - utcnow()).total_seconds()
        output = _Output(probe_id, time.monotonic() + left_s, running=owner.status == "running")
        for stream, used, last_seq in stored:
            if stream in output.used:
                output.used[stream] = int(used or 0)
            output.last_seq = max(output.last_seq, int(last_seq))
        # Another chunk may have loaded it meanwhile; keep the one already counting.
        return self._active.setdefault(request_id, output)

    def _close_output(self, request_id: str) -> None:
        """The command is finished: its output, from now on, is refused."""
        self._active.pop(request_id, None)
        self._remember_closed(request_id)

    def _remember_closed(self, request_id: str) -> None:
        self._closed[request_id] = None
        self._closed.move_to_end(request_id)
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    # ---- reads -------------------------------------------------------------------------

    async def get(self, request_id: str) -> Command:
        async with self.db.session() as session:
            row = await session.get(Command, request_id)
        if row is None:
            raise NotFound(f"no command with request id {request_id}")
        return row

    async def wait_finished(self, request_id: str, timeout_s: float) -> Command:
        """The command once it has finished, or as it stands after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.events.subscribe("command.finished") as finished:
            row = await self.get(request_id)
            while row.status in ACTIVE and (remaining := deadline - time.monotonic()) > 0:
                await finished.get(wait=min(remaining, 1.0))
                row = await self.get(request_id)
        return row

    async def approved_result(
        self, approval: ApprovalOut, probe_id: str, timeout_s: float
    ) -> tuple[Command | None, str]:
        """For a dispatched approval: the command it ran on ``probe_id`` once finished (or as
        it stands after ``timeout_s``), else None and why it did not run there."""
        result = approval.result or {}
        request_id = (result.get("request_ids") or {}).get(probe_id)
        if request_id is None:
            return None, (result.get("errors") or {}).get(probe_id, "not dispatched")
        return await self.wait_finished(request_id, timeout_s), ""

    async def pending(self) -> list[Command]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(Command).where(Command.status.in_(ACTIVE)).order_by(Command.created_at)
            )
            return list(rows)

    async def stream(self, request_id: str, after_seq: int = -1) -> AsyncIterator[Any]:
        """Chunks after ``after_seq`` (replayed from the database, then live), then the
        final command row. The live queue is bounded (``FOLLOWER_QUEUE``): a follower that
        falls behind reads what it missed from the database instead."""
        await self.get(request_id)
        queue: asyncio.Queue[Any] = asyncio.Queue(FOLLOWER_QUEUE)
        self._streams[request_id].add(queue)
        unfollow = await self.hub.follow(  # output relayed by the replica holding the probe
            request_id, lambda item: _offer(queue, _END if item is None else item)
        )
        try:
            last = after_seq
            for chunk in await self._chunks_after(request_id, after_seq):
                last = chunk.seq
                yield chunk
            row = await self.get(request_id)
            while row.status in ACTIVE:
                try:
                    item = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield None  # keep-alive
                    row = await self.get(request_id)
                    continue
                if item is _END:
                    break
                if item is _BEHIND:
                    for chunk in await self._chunks_after(request_id, last):
                        last = chunk.seq
                        yield chunk
                    continue
                if item.seq > last:
                    last = item.seq
                    yield item
            yield await self.get(request_id)
        finally:
            unfollow()
            self._streams[request_id].discard(queue)
            if not self._streams[request_id]:
                self._streams.pop(request_id, None)

    async def _chunks_after(self, request_id: str, after_seq: int) -> list[OutputChunk]:
        async with self.db.session() as session:
            rows = await session.execute(
                select(_CHUNKS.c.seq, _CHUNKS.c.stream, _CHUNKS.c.data)
                .where(_CHUNKS.c.command_id == request_id, _CHUNKS.c.seq > after_seq)
                .order_by(_CHUNKS.c.seq)
            )
            # Stored rows were checked on the way in: no need to validate them again.
            return [
                OutputChunk.model_construct(
                    request_id=request_id, seq=seq, stream=stream, data=data
                )
                for seq, stream, data in rows
            ]

    # ---- housekeeping ------------------------------------------------------------------

    async def mark_lost(self) -> list[str]:
        now = utcnow()
        async with self.db.write() as session:
            ids = list(
                await session.scalars(
                    select(Command.id).where(Command.status.in_(ACTIVE), Command.deadline_at < now)
                )
            )
            if ids:
                await session.execute(
                    update(Command)
                    .where(Command.id.in_(ids))
                    .values(
                        status="lost",
                        finished_at=now,
                        error="no result from the probe before the command's timeout",
                    )
                )
        for request_id in ids:
            self.metrics.commands.labels("lost").inc()
            self._started.pop(request_id, None)
            self._close_output(request_id)
            for queue in self._streams.get(request_id, ()):
                _offer(queue, _END)
        # Commands past their deadline that finished or were marked lost elsewhere (another
        # replica): forget them; a late chunk reads the database once and is refused.
        expired = time.monotonic()
        for request_id in [k for k, v in self._active.items() if v.deadline < expired]:
            self._active.pop(request_id, None)
        return ids

    async def close(self) -> None:
        if self._results_task is not None:
            self._results_task.cancel()
            await asyncio.gather(self._results_task, return_exceptions=True)
        await self.writer.close()

    async def run_reaper(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.mark_lost()
            except Exception:
                log.exception("lost-command pass failed")
