"""Runs commands: bounded concurrency, argv by default, a process group per command that is
killed whole on timeout and when the command ends, output capped per stream, and an
environment without the probe's own credentials."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

from legator.fleet.protocol import CommandResult, CommandSpec, OutputChunk
from legator.probe.jsonfit import MAX_ANSWER_CHARS, fit

# The probe's own settings and credentials (LEGATOR_TOKEN, LEGATOR_SERVER_URL, …) are read
# from variables with this prefix; none of them reaches a command.
PROBE_ENV_PREFIX = "LEGATOR_"
OUTPUT_CAP = 1024 * 1024  # bytes kept per stream
# Both streams go in one result: each is cut to half of what a message carries once encoded
# (1 MiB of NULs is 6 MiB of JSON).
STREAM_CHARS = MAX_ANSWER_CHARS // 2
# One read, decoded with the up to 3 bytes of a character that the previous read cut, is one
# output chunk: at most 64 KiB characters (``protocol.MAX_CHUNK_CHARS``).
READ_SIZE = 64 * 1024 - 3
# Once a command's own process has exited, what it wrote is already in its pipes: they drain
# in this long, unless a background child holds them open.
DRAIN_GRACE_S = 1.0
# Once its group is killed, how long its pipes and exit status may take to come in.
REAP_GRACE_S = 2.0
# Commands that may wait for a slot, per slot; beyond, one is refused at once: each waiting
# one holds its request (up to the 8 MiB a message may be) and a task, up to its timeout.
WAITING_PER_SLOT = 16
Emit = Callable[[OutputChunk], Awaitable[None]]


def command_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The probe's environment minus every ``LEGATOR_*`` variable, plus the command's own."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(PROBE_ENV_PREFIX)
    }
    return {**inherited, **extra}


# The watchdog: a separate small process that holds the reading end of a pipe from the
# probe, told each command's process group as it starts ("+pgid") and ends ("-pgid"). When
# the probe dies, however it dies (SIGKILL, the OOM killer), the pipe reads end-of-file and
# the watchdog kills the groups still listed. Its own session keeps a terminal's Ctrl-C
# away from it; stdlib only, so that it runs from the zipapp's interpreter as it is.
_WATCHDOG = """
import os, signal, sys
groups = set()
for line in sys.stdin.buffer:
    pgid = int(line[1:])
    if line.startswith(b"+"):
        groups.add(pgid)
    else:
        groups.discard(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupWatch:
    """The probe's side of the watchdog (see :data:`_WATCHDOG`). Without one (it could not
    start) commands still run; they are only not killed should the probe be killed."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = False

    def start(self) -> None:
        self.started = True
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={},
            )
        except OSError as exc:
            sys.stderr.write(f"command watchdog not started: {exc}\n")

    def tell(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # it died: commands go on without it
            self._proc = None

    def close(self) -> None:
        """End the watchdog (what is still listed is killed by it)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(REAP_GRACE_S)


class Executor:
    def __init__(
        self, max_concurrent: int = 4, work_dir: str | None = None, *, watchdog: bool = False
    ) -> None:
        self.max_concurrent = max_concurrent
        self._slots = asyncio.Semaphore(max_concurrent)
        self.work_dir = work_dir
        self.running: set[str] = set()
        self._waiting = 0
        self._groups: set[int] = set()  # the process group of each command running
        self._watch = GroupWatch()
        self._watchdog = watchdog  # started with the first command

    def kill_all(self) -> int:
        """Kill the process group of every command running; how many there were. For the
        probe's own shutdown: each command's task then ends as a killed command does."""
        groups = list(self._groups)
        for pgid in groups:
            _kill_group(pgid)
        return len(groups)

    def close(self) -> None:
        self.kill_all()
        self._watch.close()

    async def run(self, spec: CommandSpec, emit: Emit | None = None) -> CommandResult:
        """Run ``spec`` once a slot is free. Its timeout counts from now, waiting included:
        the control plane gives the command up at its timeout (and a grace) from sending
        it, so one started later would run (a restart, a deletion) after it was reported
        lost."""
        received = time.monotonic()
        refusal = await self._take_slot(spec)
        if refusal is not None:
            return refusal
        self.running.add(spec.request_id)
        try:
            left = spec.timeout_s - (time.monotonic() - received)
            return await self._run(spec, emit, left)
        finally:
            self.running.discard(spec.request_id)
            self._slots.release()

    async def _take_slot(self, spec: CommandSpec) -> CommandResult | None:
        """None once ``spec`` holds a slot; else the answer it gets instead."""
        if self._slots.locked() and self._waiting >= self.max_concurrent * WAITING_PER_SLOT:
            why = (
                f"the probe is busy: {self.max_concurrent} commands running and "
                f"{self._waiting} waiting, the most it takes; try again later"
            )
            return CommandResult(
                request_id=spec.request_id, status="refused", reason="busy", error=why
            )
        self._waiting += 1
        try:
            async with asyncio.timeout(spec.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            why = (
                f"never started: all {self.max_concurrent} command slots stayed busy "
                f"for its whole {spec.timeout_s:g}s timeout"
            )
            return CommandResult(request_id=spec.request_id, status="timeout", error=why)
        finally:
            self._waiting -= 1
        return None

    async def _run(self, spec: CommandSpec, emit: Emit | None, timeout_s: float) -> CommandResult:
        argv = (
            ["/bin/sh", "-c", " ".join([spec.command, *(shlex.quote(a) for a in spec.args)])]
            if spec.shell
            else [spec.command, *spec.args]
        )
        env = command_env(spec.env)
        if self._watchdog and not self._watch.started:
            self._watch.start()
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, killed whole on timeout
                env=env,
                cwd=self.work_dir,
            )
        except (OSError, ValueError) as exc:
            # Not found, not executable, no interpreter (ENOEXEC), arguments over the kernel's
            # limit (E2BIG), a NUL byte in them (ValueError): an answer, never a silent loss.
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return CommandResult(
                request_id=spec.request_id,
                status="error",
                exit_code=127,
                error=f"cannot start {argv[0]!r}: {why}",
            )
        self._groups.add(proc.pid)
        self._watch.tell(f"+{proc.pid}")
        try:
            return await self._collect(spec, emit, timeout_s, proc, started)
        finally:
            self._groups.discard(proc.pid)
            self._watch.tell(f"-{proc.pid}")

    async def _collect(
        self,
        spec: CommandSpec,
        emit: Emit | None,
        timeout_s: float,
        proc: asyncio.subprocess.Process,
        started: float,
    ) -> CommandResult:
        seq = [0]
        out, err = _Capture(), _Capture()

        async def pump(reader: asyncio.StreamReader | None, cap: _Capture, name: str) -> None:
            if reader is None:
                return
            # A read can end inside a multi-byte character: decode across reads, so that
            # the stream shows the same text as the result.
            decoder = codecs.getincrementaldecoder("utf-8")("replace")

            async def send(text: str) -> None:
                if emit is None or not text:
                    return
                number = seq[0]
                seq[0] += 1
                chunk = OutputChunk(
                    request_id=spec.request_id,
                    seq=number,
                    stream=name,  # type: ignore[arg-type]
                    data=text,
                )
                await emit(chunk)

            while chunk := await reader.read(READ_SIZE):
                await send(decoder.decode(cap.add(chunk)))
            await send(decoder.decode(b"", final=True))

        reading = asyncio.gather(pump(proc.stdout, out, "stdout"), pump(proc.stderr, err, "stderr"))
        exited = asyncio.ensure_future(_exited(proc))
        try:
            timed_out = await _run_to_exit(exited, reading, timeout_s)
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            reading.cancel()
            exited.cancel()
            raise
        # What the command left running in its group ends with it: ``cmd >/dev/null &`` holds
        # no pipe and would run on for good, ``cmd &`` holds them and would run on as well.
        _kill_group(proc.pid)
        await asyncio.wait({reading, exited}, timeout=REAP_GRACE_S)
        exited.cancel()
        if reading.done():
            reading.result()  # a pump's failure is the command's, as it always was
        else:  # held by a process that left the group (``setsid``)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        duration = int((time.monotonic() - started) * 1000)
        code = proc.returncode
        if timed_out:
            status, error = "timeout", f"killed after {spec.timeout_s:g}s timeout"
        else:
            status, error = ("completed" if code == 0 else "failed"), None
        stdout, stderr = out.text(), err.text()  # each marks itself truncated if cut
        return CommandResult(
            request_id=spec.request_id,
            status=status,  # type: ignore[arg-type]
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
            duration_ms=duration,
            truncated=out.truncated or err.truncated,
            error=error,
        )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Returns once the command's own process has exited. ``proc.wait()`` would also wait
    for its pipes to close (Python 3.11), which a background child (``sleep 100 &``) holds
    open for as long as it runs; ``returncode`` is set as soon as the process is reaped. So
    the two race: the wait answers at once in the usual case, polling when a child holds on."""
    waited = asyncio.ensure_future(proc.wait())
    try:
        pause = 0.005
        while proc.returncode is None and not waited.done():
            await asyncio.wait({waited}, timeout=pause)
            pause = min(pause * 2, 0.2)
    finally:
        waited.cancel()


async def _run_to_exit(
    exited: asyncio.Future[None], reading: asyncio.Future[object], timeout_s: float
) -> bool:
    """Whether the command ran out of time. Its output is read until its own process has
    exited, then for ``DRAIN_GRACE_S`` at most (within the timeout): a background child
    holding the pipes must not turn a finished command into a timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    await asyncio.wait({exited}, timeout=timeout_s)
    if not exited.done():
        return True
    grace = max(0.0, min(DRAIN_GRACE_S, deadline - loop.time()))
    await asyncio.wait({reading}, timeout=grace)
    return False


class _Capture:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> bytes:
        """Keep what fits under the cap; return the part kept."""
        room = OUTPUT_CAP - len(self.buffer)
        if room <= 0:
            self.truncated = True
            return b""
        kept = chunk[:room]
        if len(chunk) > room:
            self.truncated = True
        self.buffer += kept
        return kept

    def text(self) -> str:
        text = self.buffer.decode("utf-8", "replace")
        kept = fit(text, STREAM_CHARS)
        self.truncated = self.truncated or len(kept) < len(text)
        return kept
