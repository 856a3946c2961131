"""uvicorn's httptools protocol with the limits on a request's head and body that it lacks.

The body is capped by the app (LEGATOR_MAX_BODY_BYTES), but the request line and headers are
not: one anonymous request with a 300 MiB header was read whole into memory, and a client
that sends a head a byte at a time (or nothing at all) held its connection for ever. Here the
head is at most HEAD_MAX_BYTES and must arrive within HEAD_TIMEOUT_S of the connection opening
or of its first byte; either breach closes the connection (400 for the size). A body must
then keep coming: at least BODY_MIN_BYTES in every BODY_WINDOW_S until it ends (as Apache's
mod_reqtimeout asks a minimum rate), or the connection is closed, so a body trickled a byte at
a time cannot hold a connection either; a window in which the app has not taken what came
(reading paused) or not yet invited a client that sent "Expect: 100-continue" does not count.
Between requests on a kept-alive connection, uvicorn's own keep-alive timeout applies.

It also hands the app a way to drop the connection (``ABORT_EXTENSION`` in the scope's
extensions), for a response that must end while a write to a client that stopped reading is
still waiting: returning from the app would only ``close()`` the transport, which waits for a
buffer that never drains, and log an error as if the app had a bug. And it keeps the address
the connection comes from (``PEER_EXTENSION``), which uvicorn's proxy-header handling
replaces in ``client`` with what a trusted proxy's X-Forwarded-For says. Last, it tells the
app when the server begins to shut down (``DRAINING_EXTENSION``, an event set then): uvicorn
waits for every response under way, and a stream that never ends by itself (live events)
would hold every shutdown for its whole graceful period.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_MAX_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
BODY_WINDOW_S = 10.0
BODY_MIN_BYTES = 5_000  # in each window: 500 bytes a second
ABORT_EXTENSION = "legator.abort"
PEER_EXTENSION = "legator.peer"
DRAINING_EXTENSION = "legator.draining"


class HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    _body_bytes = 0
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._draining = asyncio.Event()
        self._await_head()

    def shutdown(self) -> None:
        self._draining.set()
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        self._body_arrived()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:
            self._await_head()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_arrived()
        extensions = self.scope.setdefault("extensions", {})
        extensions[ABORT_EXTENSION] = self.transport.abort
        extensions[PEER_EXTENSION] = self.client
        extensions[DRAINING_EXTENSION] = self._draining
        super().on_headers_complete()
        if self._has_body() and not self.parser.should_upgrade():
            self._await_body()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_arrived()
        super().on_message_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    def _await_body(self) -> None:
        self._body_arrived()
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(BODY_WINDOW_S, self._body_window_over)

    def _body_window_over(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        # Not the client's fault: the app has not taken what came, or has not yet asked for
        # the body a client sending "Expect: 100-continue" waits to be invited to send.
        waiting = self.flow.read_paused or (
            self.cycle is not None and self.cycle.waiting_for_100_continue
        )
        if self._body_bytes >= BODY_MIN_BYTES or waiting:
            self._await_body()
        else:
            self.transport.close()

    def _body_arrived(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > HEAD_MAX_BYTES:
            # Raised in a parser callback, it reaches uvicorn as a parser error: 400, closed.
            raise HeadTooLarge(f"request line and headers over {HEAD_MAX_BYTES} bytes")

    def _await_head(self) -> None:
        self._head_arrived()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
