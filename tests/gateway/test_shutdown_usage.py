"""Requests the server cuts off as it shuts down are recorded as 503, not as clients gone."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.conftest import register, usage_statuses
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.gateway.upstreams import LeakyUpstream
from tests.support import LiveServer, eventually

LONG = " ".join(f"w{i}" for i in range(400))  # ``slow`` streams it over 20 s


def _send(server: LiveServer, body: dict[str, Any], started: threading.Event) -> None:
    """Sends ``body``, reading its answer until the server cuts it off."""
    try:
        with (
            server.client(server.admin_key) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as answer,
        ):
            for _ in answer.iter_bytes():
                started.set()
    except httpx.HTTPError:
        pass  # the connection closed under it: what this test does to it


def test_requests_cut_off_by_shutdown_are_recorded_as_503(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    hangs = LeakyUpstream().start()
    server = LiveServer(tmp_path / "data").start()
    try:
        with server.client(server.admin_key) as api:
            register(api, "slow", upstream.url, upstream_model="slow", parallel=1)
            register(api, "hang", hangs.url, upstream_model="hang", parallel=2)
        streaming = threading.Event()
        slow = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": LONG}]}
        senders = [threading.Thread(target=_send, args=(server, slow, streaming))]
        senders[0].start()
        assert streaming.wait(20), "the stream did not begin"
        for body in (
            {**slow, "stream": False},  # waits in the queue: the stream holds the one slot
            {"model": "hang", "messages": [{"role": "user", "content": "x"}]},
            {"model": "hang", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ):
            senders.append(threading.Thread(target=_send, args=(server, body, threading.Event())))
            senders[-1].start()
        # Both ``hang`` requests reached their backend; the other one is queued.
        eventually(lambda: hangs.hanging, 2, timeout=20)
        pool = server.app.state.gateway.scheduler.pools["slow"]  # type: ignore[union-attr]
        eventually(lambda: pool.depth, 1, timeout=20)
        server._server.config.timeout_graceful_shutdown = 0.5  # type: ignore[union-attr]
        server.stop()
        for sender in senders:
            sender.join(timeout=20)
        server.start()
        assert usage_statuses(server, "slow") == [503, 503]
        assert usage_statuses(server, "hang") == [503, 503]
    finally:
        server.stop()
        hangs.stop()
