"""The probe's main loop: connect, say hello, heartbeat, and obey signed messages within
the local policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import legator.fleet.protocol as p
from legator.core.audit.sanitiser import clip_for_log
from legator.fleet.policy import Policy, evaluate, policy_problem, weakest
from legator.probe import config as config_mod
from legator.probe import fileops, inventory, updater
from legator.probe.config import ProbeConfig
from legator.probe.executor import Executor
from legator.probe.filepool import Busy, FilePool
from legator.probe.outbox import Outbox
from legator.probe.version import PROBE_VERSION

BACKOFF_START, BACKOFF_MAX, AUTH_BACKOFF = 1.0, 300.0, 30.0
# What a rejection quotes of why a message did not validate: sanitised, then cut and marked.
MAX_REASON_CHARS = 300


def log(message: str, **fields: Any) -> None:
    # Plain JSON lines on stderr: journald keeps them; no logging framework on the probe.
    sys.stderr.write(json.dumps({"event": message, **fields}, default=str) + "\n")
    sys.stderr.flush()


class Agent:
    def __init__(self, config: ProbeConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.verifier = p.Verifier(config.signing_key)
        self.executor = Executor(config.max_concurrent, config.work_dir, watchdog=True)
        self.files = FilePool()
        self.checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-check")
        self.policy = Policy(level=config.policy_level)
        self.policy_name = "local maximum"
        self.policy_refusal: str | None = None  # set while the pushed policy was refused
        self.ws: ClientConnection | None = None
        self.outbox = Outbox()
        self.tasks: set[asyncio.Task[None]] = set()
        self.restart_requested = False
        self.updating = False

    @property
    def ws_url(self) -> str:
        base = self.config.server.rstrip("/")
        return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws/probe"

    # ---- connection --------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Serve until stopped: SIGTERM or SIGINT kills the commands under way (each in a
        session of its own, which the signal does not reach) and returns."""
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        stopping: list[str] = []

        def stop(signum: int) -> None:
            if not stopping and main is not None:
                stopping.append(signal.Signals(signum).name)
                killed = self.executor.kill_all()
                log("stopping", signal=stopping[0], commands_killed=killed)
                main.cancel()

        handled = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):  # only the main thread may
                loop.add_signal_handler(signum, stop, signum)
                handled.append(signum)
        try:
            await self._serve()
        except asyncio.CancelledError:
            if not stopping:
                raise
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            if stopping:
                await self._end_tasks()
            self.executor.close()

    async def _serve(self) -> None:
        backoff = BACKOFF_START
        while not self.restart_requested:
            headers = {"Authorization": f"Bearer {self.config.api_key}"}
            try:
                async with connect(
                    self.ws_url,
                    additional_headers=headers,
                    max_size=8 * 1024 * 1024,
                    open_timeout=15,
                    ping_interval=20,
                    ping_timeout=20,
                ) as ws:
                    backoff = BACKOFF_START
                    log("connected", server=self.config.server, probe_id=self.config.probe_id)
                    await self._session(ws)
            except InvalidStatus as exc:
                code = exc.response.status_code
                log("connection refused", status=code)
                if code in (401, 403):
                    await asyncio.sleep(AUTH_BACKOFF + random.uniform(0, 5))  # noqa: S311
                    continue
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                log("disconnected", error=str(exc) or type(exc).__name__)
            finally:
                self.ws = None
            if self.restart_requested:
                break
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            backoff = min(backoff * 2, BACKOFF_MAX)
        if self.restart_requested:
            await self._end_tasks()
            updater.reexec()

    async def _end_tasks(self) -> None:
        """Cancel what is under way before the probe re-executes itself: a command's process
        group is killed when its task is cancelled, where the new process would never kill
        it at its timeout."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _session(self, ws: ClientConnection) -> None:
        self.ws = ws
        hello = p.Hello(
            probe_id=self.config.probe_id,
            version=PROBE_VERSION,
            hostname=socket.gethostname(),
            max_level=self.config.policy_level,
            policy_id=self.config.policy_id or None,
            running=sorted(self.executor.running),
        )
        await self._send(p.T_HELLO, hello)
        while self.outbox:
            await ws.send(self.outbox.first().model_dump_json())
            self.outbox.popleft()
        loops = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._inventories()),
        ]
        try:
            async for raw in ws:
                await self._on_message(raw if isinstance(raw, str) else raw.decode())
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _send(self, type_: str, payload: Any, *, keep: bool = False) -> None:
        envelope = p.new_envelope(type_, payload)
        ws = self.ws
        if ws is not None:
            try:
                await ws.send(envelope.model_dump_json())
                return
            except ConnectionClosed:
                pass
        if keep:
            self.outbox.append(envelope)  # delivered on the next connection

    async def _heartbeats(self) -> None:
        inventory.heartbeat()  # primes psutil's CPU counter
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            beat = await asyncio.to_thread(inventory.heartbeat, len(self.executor.running))
            await self._send(p.T_HEARTBEAT, beat)

    async def _inventories(self) -> None:
        while True:
            data = await asyncio.to_thread(inventory.collect)
            await self._send(p.T_INVENTORY, data)
            await asyncio.sleep(self.config.inventory_s)

    # ---- messages ----------------------------------------------------------------------

    async def _on_message(self, raw: str) -> None:
        try:
            envelope = p.Envelope.model_validate(json.loads(raw))
        except (ValueError, ValidationError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than the parser goes, which would end the
            # probe's loop, and the probe, before any signature is looked at.
            why = clip_for_log(str(exc), MAX_REASON_CHARS)  # pydantic quotes the input
            await self._reject(None, "malformed", f"unreadable message: {why}")
            return
        request_id = envelope.payload.get("request_id")
        request_id = request_id if isinstance(request_id, str) else None
        if envelope.type not in p.SIGNED_TYPES:
            await self._reject(
                request_id, "unknown_type", f"unknown message type {envelope.type!r}"
            )
            return
        try:
            self.verifier.verify(envelope)
        except p.VerificationError as exc:
            log("message rejected", reason=exc.reason, error=str(exc))
            await self._reject(request_id, exc.reason, str(exc))
            return
        try:
            await self._dispatch(envelope)
        except ValidationError as exc:
            why = clip_for_log(str(exc), MAX_REASON_CHARS)
            await self._reject(request_id, "invalid_payload", why)

    async def _reject(self, request_id: str | None, reason: str, error: str) -> None:
        result = p.CommandResult(
            request_id=request_id, status="rejected", reason=reason, error=error
        )
        await self._send(p.T_COMMAND_RESULT, result)

    async def _dispatch(self, envelope: p.Envelope) -> None:
        payload = envelope.payload
        match envelope.type:
            case p.T_COMMAND:
                self._spawn(self._command(p.CommandSpec.model_validate(payload)))
            case p.T_POLICY_UPDATE:
                await self._policy_update(envelope, p.PolicySpec.model_validate(payload))
            case p.T_ROTATE_KEY:
                spec_key = p.RotateKey.model_validate(payload)
                keys = {"api_key": spec_key.api_key}
                if spec_key.signing_key is not None:
                    keys["signing_key"] = spec_key.signing_key
                new = self.config.model_copy(update=keys)
                try:
                    config_mod.save(new, self.config_path)
                except OSError as exc:
                    await self._ack(envelope, ok=False, error=f"cannot save new key: {exc}")
                    return
                self.config = new
                detail: dict[str, Any] = {}
                if spec_key.signing_key is not None:
                    # From now on only the new signing key verifies (the replay memory stays).
                    self.verifier.key_hex = spec_key.signing_key
                    detail["signing_key"] = p.SIGNING_KEY_ROTATED
                await self._ack(envelope, detail=detail)
            case p.T_UPDATE:
                self._spawn(self._update(envelope, p.UpdateSpec.model_validate(payload)))
            case p.T_FILE_REQUEST:
                self._spawn(self._file(p.FileRequest.model_validate(payload)))
            case p.T_PING:
                await self._ack(envelope)

    async def _policy_update(self, envelope: p.Envelope, spec: p.PolicySpec) -> None:
        name = spec.name or spec.policy_id or "pushed"
        problem = policy_problem(spec.allow, spec.block, spec.paths)
        if problem is not None:
            # Keeping the previous policy could keep fewer blocks than the new one meant:
            # refuse every command and file operation until one that fits arrives.
            self.policy = Policy(level=weakest(self.config.policy_level, spec.level))
            self.policy_name, self.policy_refusal = name, f"policy too large: {problem}"
            log("policy refused", policy=name, reason=problem)
            await self._ack(envelope, ok=False, error=self.policy_refusal)
            return
        self.policy = Policy(
            level=weakest(self.config.policy_level, spec.level),
            allow=tuple(spec.allow),
            block=tuple(spec.block),
            paths=tuple(spec.paths),
        )
        self.policy_name, self.policy_refusal = name, None
        await self._ack(envelope, detail={"effective_level": self.policy.level})

    async def _ack(
        self,
        envelope: p.Envelope,
        *,
        ok: bool = True,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        ack = p.Ack(ref=envelope.id, type=envelope.type, ok=ok, error=error, detail=detail or {})
        await self._send(p.T_ACK, ack)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _command(self, spec: p.CommandSpec) -> None:
        refusal = await self._refusal(spec)
        if refusal is not None:
            log("command refused", request_id=spec.request_id, reason=refusal)
            await self._send(
                p.T_COMMAND_RESULT,
                p.CommandResult(
                    request_id=spec.request_id,
                    status="refused",
                    reason="policy",
                    error=f"refused by the probe ({self.policy_name}): {refusal}",
                ),
                keep=True,
            )
            return

        async def emit(chunk: p.OutputChunk) -> None:
            await self._send(p.T_OUTPUT, chunk)

        result = await self.executor.run(spec, emit if spec.stream else None)
        await self._send(p.T_COMMAND_RESULT, result, keep=True)

    async def _refusal(self, spec: p.CommandSpec) -> str | None:
        """Why the local policy refuses ``spec``, or None. Checked on a thread of its own:
        a long line takes up to a second or so, during which heartbeats and other messages
        go on; commands are still checked one at a time, in order."""
        if self.policy_refusal is not None:
            return self.policy_refusal
        check = functools.partial(
            evaluate,
            self.policy,
            spec.command,
            spec.args,
            shell=spec.shell,
            requested=spec.level,
            env=spec.env,  # LESSOPEN=…, LD_PRELOAD=…: what it sets can change what runs
        )
        decision = await asyncio.get_running_loop().run_in_executor(self.checker, check)
        return None if decision.allowed else decision.reason

    async def _file(self, request: p.FileRequest) -> None:
        try:
            data = await self.files.run(
                fileops.perform, request, self.policy.paths, self.config_path
            )
            result = p.FileResult(request_id=request.request_id, ok=True, data=data)
        except (fileops.FileDenied, Busy, OSError, ValueError) as exc:
            result = p.FileResult(request_id=request.request_id, ok=False, error=str(exc))
        await self._send(p.T_FILE_RESULT, result)

    async def _update(self, envelope: p.Envelope, spec: p.UpdateSpec) -> None:
        if not self.config.updates_allowed():
            # An update runs whatever code it brings: past any local maximum below remediate,
            # which no control-plane message may raise.
            error = (
                f"updates are off on this probe (local maximum {self.config.policy_level}); "
                "its owner turns them on with allow_updates: true in probe.yaml"
            )
            await self._ack(envelope, ok=False, error=error)
            return
        if self.updating:
            # Each download holds a thread of the shared pool and up to 200 MiB of memory.
            await self._ack(envelope, ok=False, error="an update is already under way")
            return
        self.updating = True
        try:
            await asyncio.to_thread(updater.apply, spec, updater.current_zipapp())
        except (updater.UpdateRefused, OSError) as exc:
            await self._ack(envelope, ok=False, error=str(exc))
            return
        finally:
            self.updating = False
        await self._ack(envelope, detail={"version": spec.version})
        self.restart_requested = True
        if self.ws is not None:
            await self.ws.close()
