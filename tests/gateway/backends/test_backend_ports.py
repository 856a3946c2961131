"""The free-port race: the port picked for a backend is free when picked, but another
process may take it before the backend binds it. The backend (a real llama.cpp server,
llama-cpp-python on the tiny GGUF) is then started again on another port, the foreign server
never gets its key nor its requests, and a start gives up, saying why, after three ports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from legator.gateway import supervisor as supervisor_module
from tests.gateway.backends.conftest import register_managed
from tests.support import LiveServer

pytestmark = pytest.mark.slow


class Foreign:
    """Another program's server on the port the gateway picked: it answers 200 to anything
    (like a llama.cpp server run without a key) and records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Authorization")))
                body = b'{"object": "list", "data": []}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Foreign:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def foreign() -> Iterator[Foreign]:
    with Foreign() as server:
        yield server


def taking(foreign: Foreign, times: int) -> Callable[[], int]:
    """A port picker whose first ``times`` picks another process takes before the backend."""
    real = supervisor_module._free_port
    picks: list[int] = []

    def pick() -> int:
        picks.append(foreign.port if len(picks) < times else real())
        return picks[-1]

    return pick


def test_a_port_taken_before_the_backend_binds_it_is_replaced(
    gw: LiveServer,
    admin: httpx.Client,
    gguf_file: Path,
    foreign: Foreign,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "_free_port", taking(foreign, 1))
    register_managed(admin, "tiny", gguf_file)
    started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    # The foreign server was never asked anything: not even the health check, with its key.
    assert foreign.requests == [], foreign.requests
    assert started["state"] == "ready", started
    assert started["port"] != foreign.port
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert foreign.requests == []
    log = gw.data_dir / "gateway" / "backends" / "tiny" / "server.log"  # type: ignore[operator]
    assert "address already in use" in log.read_text()  # why the first launch exited
    assert admin.post("/api/v1/gateway/backends/tiny/stop").json()["state"] == "stopped"


def test_a_start_gives_up_when_every_port_is_taken(
    gw: LiveServer,
    admin: httpx.Client,
    gguf_file: Path,
    foreign: Foreign,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "_free_port", taking(foreign, 100))
    register_managed(admin, "tiny", gguf_file)
    started = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    assert foreign.requests == [], foreign.requests
    assert started["state"] == "failed", started
    assert "3 times" in started["error"] and str(foreign.port) in started["error"]
    assert admin.get("/api/v1/gateway/models/tiny").json()["state"] == "unavailable"
    assert "tiny" not in gw.app.state.gateway.scheduler.pools  # type: ignore[union-attr]
