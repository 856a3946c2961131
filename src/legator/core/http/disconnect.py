"""A request whose client may leave before it is answered: noticing that, and stopping the
work done for it (a backend's answer, a model's turn) instead of finishing it for nobody."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


async def wait_disconnect(request: Request) -> None:
    """Returns once ``request``'s client has gone (its body already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: ``work`` is then cancelled,
    which stops what it was doing (a backend's connection is closed), and ``ClientGone`` raised.

    ``work`` runs in this task, and one watcher cancels it if the client goes: racing it as a
    task of its own with ``asyncio.wait`` cost every request a tenth of a millisecond more."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await wait_disconnect(request)
        gone = True
        handler.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled for another reason (shutdown): not ours to absorb
        handler.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()
