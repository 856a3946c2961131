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
import time
from collections.abc import Awaitable, Callable, Mapping

from legator.fleet.protocol import CommandResult, CommandSpec, OutputChunk

# The probe's own settings and credentials (LEGATOR_TOKEN, LEGATOR_SERVER_URL, …) are read
# from variables with this prefix; none of them reaches a command.
PROBE_ENV_PREFIX = "LEGATOR_"
OUTPUT_CAP = 1024 * 1024  # bytes kept per stream
# One read, decoded with the up to 3 bytes of a character that the previous read cut, is one
# output chunk: at most 64 KiB characters (``protocol.MAX_CHUNK_CHARS``).
READ_SIZE = 64 * 1024 - 3
Emit = Callable[[OutputChunk], Awaitable[None]]


def command_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The probe's environment minus every ``LEGATOR_*`` variable, plus the command's own."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(PROBE_ENV_PREFIX)
    }
    return {**inherited, **extra}


class Executor:
    def __init__(self, max_concurrent: int = 4, work_dir: str | None = None) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self.work_dir = work_dir
        self.running: set[str] = set()

    async def run(self, spec: CommandSpec, emit: Emit | None = None) -> CommandResult:
        async with self._slots:
            self.running.add(spec.request_id)
            try:
                return await self._run(spec, emit)
            finally:
                self.running.discard(spec.request_id)

    async def _run(self, spec: CommandSpec, emit: Emit | None) -> CommandResult:
        argv = (
            ["/bin/sh", "-c", " ".join([spec.command, *(shlex.quote(a) for a in spec.args)])]
            if spec.shell
            else [spec.command, *spec.args]
        )
        env = command_env(spec.env)
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

        pumps = asyncio.gather(
            pump(proc.stdout, out, "stdout"), pump(proc.stderr, err, "stderr"), proc.wait()
        )
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(pumps), spec.timeout_s)
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # Grandchildren may hold the pipes open; stop reading after a short while.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pumps), 2)
            if not pumps.done():
                pumps.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pumps
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        else:
            # What the command left running in its group ends with it: ``cmd >/dev/null &``
            # holds no pipe, so no timeout comes to kill it, and it would run on for good.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        duration = int((time.monotonic() - started) * 1000)
        code = proc.returncode
        if timed_out:
            status, error = "timeout", f"killed after {spec.timeout_s:g}s timeout"
        else:
            status, error = ("completed" if code == 0 else "failed"), None
        return CommandResult(
            request_id=spec.request_id,
            status=status,  # type: ignore[arg-type]
            exit_code=code,
            stdout=out.text(),
            stderr=err.text(),
            duration_ms=duration,
            truncated=out.truncated or err.truncated,
            error=error,
        )


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
        return self.buffer.decode("utf-8", "replace")
