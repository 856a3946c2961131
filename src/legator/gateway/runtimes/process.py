"""``process``: a supervised llama.cpp server on the host.

Either llama.cpp's ``llama-server`` (key through ``--api-key-file``) or llama-cpp-python's
``python -m llama_cpp.server`` (everything, key included, in a 0600 JSON config file). Either
way the key never appears in the process arguments. The server runs in its own session so a
crash of the control plane leaves it adoptable; reconciliation decides what happens to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

from legator.core.security import write_private_file
from legator.gateway.runtimes.base import (
    LOG_MAX_BYTES,
    PORT_TAKEN,
    STOP_GRACE_S,
    Handle,
    Launch,
    Runtime,
    RuntimeError_,
)


def _python_server_config(launch: Launch) -> dict[str, object]:
    args = launch.args
    model: dict[str, object] = {
        "model": launch.model.model_path,
        "model_alias": launch.model.id,
        "n_ctx": launch.total_context,
        "n_gpu_layers": args.n_gpu_layers,
    }
    if args.threads:
        model["n_threads"] = args.threads
    if args.chat_format:
        model["chat_format"] = args.chat_format
    return {
        "host": "127.0.0.1",
        "port": launch.port,
        "api_key": launch.api_key,
        "models": [model],
    }


KILL_WAIT_S = 10.0  # how long a stop waits for a killed server to be gone
START_OUTPUT_BYTES = 64 * 1024  # how much of a failed start's output is searched for why


class ProcessRuntime(Runtime):
    kind = "process"

    def __init__(self, server: str = "auto") -> None:
        self.server = server
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.log_starts: dict[int, int] = {}  # pid -> size of server.log when it was started

    def flavour(self) -> tuple[str, str | None]:
        """('llama-server', path) or ('llama-cpp-python', None)."""
        choice = self.server
        if choice == "llama-cpp-python":
            return "llama-cpp-python", None
        if choice in ("auto", "llama-server"):
            found = shutil.which("llama-server")
            if found:
                return "llama-server", found
            if choice == "llama-server":
                raise RuntimeError_("llama-server is not on PATH")
            return "llama-cpp-python", None
        if not os.access(choice, os.X_OK):
            raise RuntimeError_(f"LEGATOR_GATEWAY_LLAMA_SERVER: {choice} is not executable")
        return "llama-server", choice

    @property
    def health_path(self) -> str:  # type: ignore[override]
        # llama-cpp-python has no /health; its model list answers only once the model loaded.
        return "/health" if self.flavour()[0] == "llama-server" else "/v1/models"

    def command(self, launch: Launch) -> list[str]:
        flavour, exe = self.flavour()
        if flavour == "llama-cpp-python":
            config = launch.workdir / "server.json"
            write_private_file(config, json.dumps(_python_server_config(launch)))
            return [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)]
        key_file = launch.workdir / "api_key"
        write_private_file(key_file, launch.api_key)
        args = launch.args
        command = [
            str(exe),
            "-m", launch.model.model_path,
            "--alias", launch.model.id,
            "--host", "127.0.0.1",
            "--port", str(launch.port),
            "-c", str(launch.total_context),
            "-np", str(launch.model.parallel),
            "-ngl", str(args.n_gpu_layers),
            "--api-key-file", str(key_file),
        ]  # fmt: skip
        if args.threads:
            command += ["-t", str(args.threads)]
        if args.jinja:
            command.append("--jinja")
        return command

    async def start(self, launch: Launch) -> Handle:
        # Both on a thread: command() writes and fsyncs the backend's key file.
        command = await asyncio.to_thread(self.command, launch)
        log_start = await asyncio.to_thread(_size, launch.workdir / "server.log")
        child = await asyncio.to_thread(self._spawn, command, launch.workdir)
        self.children[child.pid] = child
        self.log_starts[child.pid] = log_start
        return Handle(pid=child.pid, pid_started=psutil.Process(child.pid).create_time())

    @staticmethod
    def _spawn(command: list[str], workdir: Path) -> subprocess.Popen[bytes]:
        # Popen rather than asyncio's subprocess API: the server must outlive this event loop
        # (and this control plane, if it crashes) to be adopted by the next one.
        with (workdir / "server.log").open("ab") as sink:
            try:
                return subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env=backend_environment(os.environ),
                    start_new_session=True,
                )
            except OSError as exc:
                raise RuntimeError_(f"could not run {command[0]}: {exc}") from None

    def _process(self, handle: Handle) -> psutil.Process | None:
        if handle.pid is None:
            return None
        child = self.children.get(handle.pid)
        if child is not None and child.poll() is not None:
            self.children.pop(handle.pid, None)  # reaped
            return None
        try:
            proc = psutil.Process(handle.pid)
            # The pid alone could have been reused by an unrelated process since.
            if handle.pid_started is not None and abs(proc.create_time() - handle.pid_started) > 1:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    async def alive(self, handle: Handle) -> bool:
        return self._process(handle) is not None

    async def holds_port(self, handle: Handle, port: int) -> bool:
        proc = self._process(handle)
        return proc is not None and await asyncio.to_thread(_listens_on, proc, port)

    async def port_taken(self, handle: Handle, workdir: Path) -> bool:
        # Only what this start wrote: the log keeps the output of earlier ones.
        start = self.log_starts.pop(handle.pid, None) if handle.pid is not None else None
        if start is None:
            return False
        output = await asyncio.to_thread(_read_from, workdir / "server.log", start)
        return PORT_TAKEN.search(output) is not None

    async def stop(self, handle: Handle, *, grace_s: float = STOP_GRACE_S) -> None:
        if handle.pid is not None:
            self.log_starts.pop(handle.pid, None)
        proc = self._process(handle)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError:
            proc.terminate()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline and self._process(handle) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        if self._process(handle) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # Killed, it still takes a while to exit when it holds a large model's memory:
            # until it has, that memory is not free for the next start (and it is not reaped).
            deadline = loop.time() + KILL_WAIT_S
            while loop.time() < deadline and self._process(handle) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def logs(self, handle: Handle, workdir: Path, tail: int) -> str:
        return tail_file(workdir / "server.log", tail)

    async def trim_logs(self, workdir: Path) -> None:
        await asyncio.to_thread(trim_log, workdir / "server.log", LOG_MAX_BYTES)


# What a llama.cpp server may need from the control plane's environment: the system's basics
# and its GPU, math-library and llama.cpp settings. Nothing else: the control plane's holds
# its signing key, database URL, provider keys and hub token, and the backend, a network
# server loading files from the internet, outlives it with its environment readable in /proc.
_BACKEND_VARIABLES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONPATH"}
)
_BACKEND_PREFIXES = (
    "LC_", "CUDA_", "NVIDIA_", "ROCR_", "HIP_", "HSA_", "GGML_", "LLAMA_", "OMP_",
    "OPENBLAS_", "MKL_", "VK_", "GPU_",
)  # fmt: skip


def backend_environment(environment: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environment.items()
        if name in _BACKEND_VARIABLES or name.startswith(_BACKEND_PREFIXES)
    }


def trim_log(path: Path, max_bytes: int) -> None:
    """Past ``max_bytes``, keep the log's last half in ``<name>.1`` and empty it in place.
    The server outlives this control plane and writes to the file it was started with, so
    the file cannot be replaced; it appends (O_APPEND), so its next line lands at the start
    of the emptied file, not past a hole. Lines written between the copy and the truncation
    are lost: a few, once per rotation."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size <= max_bytes:
        return
    with path.open("rb") as source:
        source.seek(size - max_bytes // 2)
        source.readline()  # start at a whole line
        kept = source.read()
    path.with_name(path.name + ".1").write_bytes(kept)
    os.truncate(path, 0)


def _listens_on(proc: psutil.Process, port: int) -> bool:
    """Whether ``proc`` or one of its children (a wrapper script's server) listens on
    ``port``."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return False
    for member in family:
        try:
            connections = member.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            return True
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """At most START_OUTPUT_BYTES of ``path`` from ``offset`` on: its end, where it is longer."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(min(offset, size), size - START_OUTPUT_BYTES))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def tail_file(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 256 * 1024))
        data = fh.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])
