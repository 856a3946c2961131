"""The event bus and its SSE endpoint."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx

from legator.core.events import InMemoryEventBus
from legator.core.events.bus import topic_matches
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
