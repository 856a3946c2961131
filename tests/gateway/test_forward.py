"""A forwarded answer that the serving replica cuts off must not reach the client as whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from legator.core.http.protocol import ABORT_EXTENSION
from legator.gateway.forward import _body
from legator.gateway.relay import RelayResponse, StreamState


class _Content:
    async def iter_any(self) -> AsyncIterator[bytes]:
        yield b'{"id": "chatcmpl-1", "choi'
        raise aiohttp.ClientPayloadError("the serving replica went away")


class _Upstream:
    def __init__(self) -> None:
        self.content = _Content()
        self.released = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        pass


async def test_a_cut_off_forwarded_answer_drops_the_connection() -> None:
    upstream = _Upstream()
    state = StreamState()
    closed: list[bool] = []
    response = RelayResponse(
        _body(upstream, state),  # type: ignore[arg-type]
        upstream,  # type: ignore[arg-type]
        state,
        on_close=lambda: closed.append(True),
        status=200,
        headers=[(b"content-type", b"application/json")],
    )
    sent: list[dict[str, Any]] = []
    aborted: list[bool] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        return {}

    scope = {"type": "http", "extensions": {ABORT_EXTENSION: lambda: aborted.append(True)}}
    await response(scope, receive, send)
    assert sent[0]["status"] == 200
    assert sent[0]["headers"] == [(b"content-type", b"application/json")]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    # What came is passed on, but the body is never declared complete: the connection drops.
    assert [m["body"] for m in bodies] == [b'{"id": "chatcmpl-1", "choi']
    assert all(m["more_body"] for m in bodies)
    assert aborted == [True] and closed == [True] and upstream.released
    assert state.error is not None
