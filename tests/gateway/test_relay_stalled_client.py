"""A streaming client that stops reading, over a real socket: it must not keep the slot."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time

import httpx
import pytest
from sqlalchemy import select

from legator.gateway import relay
from legator.gateway.models import GatewayUsage
from tests.gateway.conftest import new_key
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer


def _wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_stops_reading_frees_the_slot_and_is_recorded(
    gw: LiveServer,
    admin: httpx.Client,
    upstream: ScriptedUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "SEND_STALL_S", 0.5)
    server_errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: server_errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    key = new_key(admin, "slowreader")
    # 40,000 words: a stream of several MB, more than the client's and the server's socket
    # buffers hold, so the gateway's sends wait once the client stops reading.
    body = json.dumps(
        {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a " * 40_000}]}
    ).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", gw.port))
    try:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        assert client.recv(100).startswith(b"HTTP/1.1 200")
        # From here on the client reads nothing, and stays connected.
        pool = gateway.scheduler.pools["echo"]
        assert pool.parallel == 1 and pool.in_use == 1
        # Freed once the buffers are full and a send has waited SEND_STALL_S (the old relay
        # kept it until the client went away).
        assert _wait_for(lambda: pool.in_use == 0, 15), "the stalled stream kept the slot"
        assert _wait_for(lambda: upstream.active_streams == 0, 5), "the upstream stream stayed"
        # The slot serves someone else at once.
        other = new_key(admin, "other")
        with gw.client(other) as raw:
            reply = raw.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                timeout=5,
            )
        assert reply.status_code == 200, reply.text
        # The server ended the connection, and logged no error for it: the client stopping is
        # not the server's fault (uvicorn logs one when an app leaves a response unfinished).
        client.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(1 << 16):
                pass
        assert server_errors == []
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
        client.close()
    gw.call(gateway.recorder.flush())

    async def rows() -> list[tuple[str, bool, int]]:
        async with gw.core.db.session() as session:  # type: ignore[union-attr]
            found = await session.execute(
                select(GatewayUsage.username, GatewayUsage.stream, GatewayUsage.status)
            )
            return [tuple(row) for row in found.all()]  # type: ignore[misc]

    recorded = gw.call(rows())
    assert ("slowreader", True, relay.STALLED) in recorded, recorded
    assert ("other", False, 200) in recorded
