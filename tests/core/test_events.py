"""The event bus and its SSE endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import ExitStack

import httpx

from legator.core.events import InMemoryEventBus
from legator.core.events.bus import topic_matches
from legator.core.http.live import PER_HOLDER
from tests.support import LiveServer


def test_topic_matching() -> None:
    assert topic_matches("*", "probe.connected")
    assert topic_matches("probe.*", "probe.connected")
    assert not topic_matches("probe.*", "approval.requested")
    assert topic_matches("probe.connected", "probe.connected")


async def test_bus_delivers_and_bounds_queues() -> None:
    bus = InMemoryEventBus()
    with bus.subscribe("probe.*", maxsize=2) as sub:
        for i in range(3):
            await bus.publish("probe.connected", {"i": i})
        await bus.publish("other.thing", {})
        first = await sub.get(wait=1)
        second = await sub.get(wait=1)
        assert [first.data["i"], second.data["i"]] == [1, 2]  # the oldest was dropped
        assert sub.dropped == 1
        assert await sub.get(wait=0.05) is None
    assert bus.subscriber_count == 0


def test_sse_stream_relays_published_events(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    received: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        with (
            server.client(server.admin_key) as client,
            client.stream("GET", "/api/v1/events", params={"topics": "test.*"}) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            ready.set()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    received.append(json.loads(line[5:]))
                    return

    thread = threading.Thread(target=listen)
    thread.start()
    assert ready.wait(10)
    for _ in range(50):
        if server.core.events.subscriber_count:
            break
        asyncio.run(asyncio.sleep(0.05))
    server.call(server.core.events.publish("test.hello", {"n": 1}))
    thread.join(10)
    assert received and received[0]["topic"] == "test.hello" and received[0]["data"] == {"n": 1}


def test_bad_topic_pattern_is_400(api: httpx.Client) -> None:
    response = api.get("/api/v1/events", params={"topics": "bad pattern!"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_a_stream_ends_once_its_key_is_revoked(api: httpx.Client, server: LiveServer) -> None:
    api.post(
        "/api/v1/users",
        json={"username": "watcher", "password": "correct horse battery", "role": "viewer"},
    )
    key = api.post("/api/v1/keys", json={"name": "t", "user": "watcher"}).json()
    ended = threading.Event()

    def listen() -> None:
        with (
            server.client(key["key"]) as client,
            client.stream("GET", "/api/v1/events") as response,
        ):
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
        ended.set()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert server.core is not None
    for _ in range(100):
        if server.core.events.subscriber_count:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert api.delete(f"/api/v1/keys/{key['id']}").status_code == 200
    assert ended.wait(10), "a revoked key kept its event stream"


def test_one_user_holds_a_bounded_number_of_streams(make_user) -> None:  # type: ignore[no-untyped-def]
    viewer = make_user("viewer")
    with ExitStack() as streams:
        for _ in range(PER_HOLDER):
            response = streams.enter_context(viewer.stream("GET", "/api/v1/events"))
            assert response.status_code == 200
        with viewer.stream("GET", "/api/v1/events") as refused:
            assert refused.status_code == 429, "one user opened event streams without limit"
            assert refused.headers["retry-after"]
            message = json.loads(refused.read())["error"]["message"]
            assert "event streams are already open" in message
