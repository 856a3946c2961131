"""A real llama.cpp server (llama-cpp-python's OpenAI-compatible server) on the tiny GGUF,
for tests that need a real backend."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.gateway.tiny_gguf import tiny_gguf
from tests.support import free_port


@contextmanager
def llama_server(log: Path, *, n_ctx: int, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Start the server, wait until it answers, yield its ``…/v1`` base URL, stop it."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(tiny_gguf()),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        *extra,
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama.cpp server did not start"
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
