"""Admin changes made while requests wait or run: a model patched, deleted or re-created under
them, and a fairness window widened at runtime."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from legator.core.db import utcnow
from legator.gateway.models import GatewaySetting, GatewayUsage
from legator.gateway.service import SETTINGS_KEY, Gateway
from tests.gateway.conftest import register, usage_statuses
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer, eventually


class GatedUpstream:
    """A chat-completions server whose answers wait until ``gate`` is set; it counts the
    requests it holds at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.bodies: list[dict[str, Any]] = []
        self.active = 0
        self.peak = 0
        lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    upstream.bodies.append(body)
                    upstream.active += 1
                    upstream.peak = max(upstream.peak, upstream.active)
                try:
                    upstream.gate.wait(10)
                finally:
                    with lock:
                        upstream.active -= 1
                answer = {
                    "id": "chatcmpl-gated",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "gated"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated() -> Iterator[GatedUpstream]:
    server = GatedUpstream()
    yield server
    server.close()


@pytest.fixture
def calls() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def gateway(gw: LiveServer) -> Gateway:
    assert gw.app is not None
    return gw.app.state.gateway  # type: ignore[no-any-return]


def chat(gw: LiveServer, model: str, text: str) -> httpx.Response:
    with gw.client(gw.admin_key) as client:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        return client.post("/v1/chat/completions", json=body)


def depth(gw: LiveServer, model: str) -> int:
    pool = gateway(gw).scheduler.pools.get(model)
    return pool.depth if pool is not None else 0


def one_running_one_queued(
    gw: LiveServer, calls: ThreadPoolExecutor, gated: GatedUpstream, model: str, pool: str = ""
) -> tuple[Future[httpx.Response], Future[httpx.Response]]:
    """A request held by ``gated`` and one queued behind it (``model`` has one slot; a
    category's name as ``model`` queues on the ``pool`` of the model it resolves to)."""
    running = calls.submit(chat, gw, model, "running")
    eventually(lambda: gated.active, 1)
    queued = calls.submit(chat, gw, model, "queued")
    eventually(lambda: depth(gw, pool or model), 1)
    return running, queued


def test_a_model_disabled_while_requests_wait_refuses_them(
    gw: LiveServer, admin: httpx.Client, gated: GatedUpstream, calls: ThreadPoolExecutor
) -> None:
    register(admin, "held", gated.url)
    running, queued = one_running_one_queued(gw, calls, gated, "held")
    patched = admin.patch("/api/v1/gateway/models/held", json={"state": "disabled"})
    assert patched.status_code == 200, patched.text
    gated.gate.set()
    assert running.result().status_code == 200
    refused = queued.result()
    assert refused.status_code == 503, refused.text
    assert [b["messages"][0]["content"] for b in gated.bodies] == ["running"]
    assert gateway(gw).scheduler.pools["held"].in_use == 0
    assert usage_statuses(gw, "held") == [200, 503]


def test_queued_requests_go_to_the_backend_the_model_has_when_served(
    gw: LiveServer,
    admin: httpx.Client,
    gated: GatedUpstream,
    upstream: ScriptedUpstream,
    calls: ThreadPoolExecutor,
) -> None:
    register(admin, "moving", gated.url, upstream_model="old-name")
    running, queued = one_running_one_queued(gw, calls, gated, "moving")
    moved = admin.patch(
        "/api/v1/gateway/models/moving",
        json={"backend_url": upstream.url, "upstream_model": "echo"},
    )
    assert moved.status_code == 200, moved.text
    gated.gate.set()
    assert running.result().status_code == 200
    served = queued.result()
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == "echo: queued"
    assert [(b["model"], b["messages"][0]["content"]) for b in gated.bodies] == [
        ("old-name", "running")
    ]
    assert ("echo", "queued") in [
        (b["model"], b["messages"][0]["content"]) for b in upstream.requests if "messages" in b
    ]


def test_requests_dropped_from_a_deleted_models_queue_leave_a_row(
    gw: LiveServer, admin: httpx.Client, gated: GatedUpstream, calls: ThreadPoolExecutor
) -> None:
    register(admin, "doomed", gated.url)
    running, queued = one_running_one_queued(gw, calls, gated, "doomed")
    assert admin.delete("/api/v1/gateway/models/doomed").status_code == 204
    dropped = queued.result()
    assert dropped.status_code == 503, dropped.text
    gated.gate.set()
    assert running.result().status_code == 200
    assert usage_statuses(gw, "doomed") == [200, 503]


def category_of_two(admin: httpx.Client, gated: GatedUpstream, upstream: ScriptedUpstream) -> None:
    """Category ``pair``: ``first`` (gated, one slot) preferred, ``second`` (echo) beside it."""
    assert admin.post("/api/v1/gateway/categories", json={"name": "pair"}).status_code == 201
    register(admin, "first", gated.url, categories=["pair"])
    register(admin, "second", upstream.url, upstream_model="echo", categories=["pair"])
    preferred = admin.patch("/api/v1/gateway/categories/pair", json={"preferred_model": "first"})
    assert preferred.status_code == 200, preferred.text


def usage_rows(gw: LiveServer) -> list[tuple[str, str | None, int]]:
    gw.call(gateway(gw).recorder.flush())

    async def read() -> list[tuple[str, str | None, int]]:
        async with gw.core.db.session() as session:  # type: ignore[union-attr]
            query = select(GatewayUsage.model_id, GatewayUsage.category, GatewayUsage.status)
            return sorted(tuple(row) for row in (await session.execute(query)).all())

    return gw.call(read())


@pytest.mark.parametrize("change", ["disable", "delete"])
def test_a_request_queued_through_a_category_goes_to_another_of_its_models(
    gw: LiveServer,
    admin: httpx.Client,
    gated: GatedUpstream,
    upstream: ScriptedUpstream,
    calls: ThreadPoolExecutor,
    change: str,
) -> None:
    category_of_two(admin, gated, upstream)
    running, queued = one_running_one_queued(gw, calls, gated, "pair", pool="first")
    if change == "disable":
        changed = admin.patch("/api/v1/gateway/models/first", json={"state": "disabled"})
        assert changed.status_code == 200, changed.text
        gated.gate.set()
    else:
        assert admin.delete("/api/v1/gateway/models/first").status_code == 204
    served = queued.result()
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == "echo: queued"
    gated.gate.set()
    assert running.result().status_code == 200
    assert [b["messages"][0]["content"] for b in gated.bodies] == ["running"]
    assert usage_rows(gw) == [("first", "pair", 200), ("second", "pair", 200)]
    assert gateway(gw).scheduler.pools["second"].in_use == 0


def test_a_request_queued_through_a_category_with_no_other_model_ready_is_refused(
    gw: LiveServer,
    admin: httpx.Client,
    gated: GatedUpstream,
    upstream: ScriptedUpstream,
    calls: ThreadPoolExecutor,
) -> None:
    category_of_two(admin, gated, upstream)
    assert admin.patch("/api/v1/gateway/models/second", json={"state": "disabled"}).is_success
    running, queued = one_running_one_queued(gw, calls, gated, "pair", pool="first")
    assert admin.patch("/api/v1/gateway/models/first", json={"state": "disabled"}).is_success
    gated.gate.set()
    refused = queued.result()
    assert refused.status_code == 503, refused.text
    assert "no model of category 'pair' is ready" in refused.text
    assert running.result().status_code == 200
    assert usage_rows(gw) == [("first", "pair", 200), ("first", "pair", 503)]


def test_a_model_recreated_while_a_request_runs_keeps_its_slot_count(
    gw: LiveServer, admin: httpx.Client, gated: GatedUpstream, calls: ThreadPoolExecutor
) -> None:
    register(admin, "again", gated.url)
    running = calls.submit(chat, gw, "again", "running")
    eventually(lambda: gated.active, 1)
    assert admin.delete("/api/v1/gateway/models/again").status_code == 204
    register(admin, "again", gated.url)
    second = calls.submit(chat, gw, "again", "second")
    # The old request still holds the backend's one slot: the new one waits for it.
    eventually(lambda: depth(gw, "again") + gated.active, 2)
    assert gated.active == 1 and depth(gw, "again") == 1
    gated.gate.set()
    assert running.result().status_code == 200
    assert second.result().status_code == 200
    assert gated.peak == 1
    eventually(lambda: gateway(gw).scheduler.pools["again"].in_use, 0)


def recent_tokens(gw: LiveServer, user: str, minutes: float) -> int:
    async def read() -> int:
        return gateway(gw).scheduler.usage.recent(user, minutes * 60)

    return gw.call(read())


def test_a_wider_window_counts_older_usage_at_once(gw: LiveServer, admin: httpx.Client) -> None:
    db = gw.core.db  # type: ignore[union-attr]

    async def write(*rows: Any) -> None:
        async with db.write() as session:
            for row in rows:
                await session.merge(row)

    old = GatewayUsage(
        ts=utcnow() - timedelta(minutes=90),
        user_id="u-old",
        model_id="echo",
        endpoint="chat",
        input_tokens=200,
        output_tokens=300,
    )
    gw.call(write(old))
    assert recent_tokens(gw, "u-old", 120) == 0  # outside the 60 minutes loaded at start

    widened = admin.patch("/api/v1/gateway/settings", json={"window_minutes": 120})
    assert widened.status_code == 200, widened.text
    assert recent_tokens(gw, "u-old", 120) == 500

    narrowed = admin.patch("/api/v1/gateway/settings", json={"window_minutes": 60})
    assert narrowed.status_code == 200, narrowed.text
    assert recent_tokens(gw, "u-old", 60) == 0

    # Widened through another replica: this one reads the settings again when told.
    settings = {**narrowed.json(), "window_minutes": 120}
    gw.call(write(GatewaySetting(key=SETTINGS_KEY, value=settings)))
    gw.call(gateway(gw)._reload("settings"))
    assert gateway(gw).scheduler.config.window_minutes == 120
    assert recent_tokens(gw, "u-old", 120) == 500
