"""Talking to a backend: one JSON call, or a stream relayed event by event as it arrives.

Usage is read from the upstream's own ``usage`` (we ask for it in streams with
``stream_options.include_usage`` and drop that extra chunk when the client did not ask).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from legator.core.audit.sanitiser import clip_for_log
from legator.core.http.disconnect import unless_gone
from legator.core.http.protocol import ABORT_EXTENSION
from legator.core.logging import get_logger
from legator.gateway.counts import usage_counts
from legator.gateway.errors import UpstreamError
from legator.gateway.service import CANCELLED, Admission

log = get_logger("legator.gateway.relay")
T = TypeVar("T")

DONE = b"data: [DONE]"
# What any event that ends a stream holds, however its fields are written (``data:[DONE]``,
# after an ``id:`` line): looked for where ``DONE`` alone would miss those.
DONE_DATA = b"[DONE]"
USAGE = b'"usage"'
ERROR = b'"error"'
# Of an error answer, enough for its message: the rest is not read.
ERROR_BODY_BYTES = 64 * 1024
# Of a backend's error message, what a client is shown; of a body that is not JSON (an HTML
# page from a proxy, say), less.
ERROR_TEXT_CHARS = 500
ERROR_PAGE_CHARS = 200


class OversizedAnswer(Exception):
    """The backend's answer, or one event of its stream, is larger than the gateway takes
    (``LEGATOR_GATEWAY_MAX_ANSWER_BYTES``): a broken or hostile backend cannot make it hold
    an endless body in memory."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"its answer exceeded {limit} bytes")


# What a failing upstream connection raises in aiohttp, and what we raise reading it.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OversizedAnswer)
# A client that accepts no part of a stream for this long loses it: the slot the stream holds
# is GPU capacity others queue for. Streams are looked at every half of it, so one is ended
# 1 to 1.5 times this after its client stopped reading.
SEND_STALL_S = 30.0
# The status such a stream is recorded with: the client did not take the response in time.
STALLED = 408


def _reason(exc: Exception) -> str:
    # An exception's text can carry the backend's address; a type name cannot.
    return str(exc) if isinstance(exc, OversizedAnswer) else type(exc).__name__


def unreachable(adm: Admission, exc: Exception) -> str:
    if isinstance(exc, OversizedAnswer):
        return f"model {adm.model.id!r} backend failed: {exc}"
    return f"model {adm.model.id!r} backend unreachable: {_reason(exc)}"


def died(adm: Admission, exc: Exception) -> str:
    return f"the backend of model {adm.model.id!r} failed mid-stream: {_reason(exc)}"


def reported(adm: Admission, data: Any) -> str | None:
    """What is wrong, when ``data`` is an error the backend sent inside its stream
    (``data: {"error": …}``, as vLLM does) rather than a chunk."""
    if not isinstance(data, dict) or "error" not in data or data.get("choices"):
        return None
    error = data["error"]
    message = error.get("message") if isinstance(error, dict) else error
    return f"the backend of model {adm.model.id!r} failed mid-stream: {clipped(str(message))}"


def masked_error(data: dict[str, Any]) -> bytes:
    """A backend's error event as passed on to a client: its message masked and cut."""
    error = data["error"]
    if isinstance(error, dict):
        error = {**error, "message": clipped(str(error.get("message", "")))}
    else:
        error = clipped(str(error))
    return b"data: " + json.dumps({**data, "error": error}).encode()


def upstream_body(adm: Admission, body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "model": adm.model.upstream_model or adm.model.id}


def clipped(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    """A backend's error text fit for a client and the logs: secrets masked (it may echo a
    request's Authorization header), then cut to ``limit`` characters, marked where cut."""
    return clip_for_log(text, limit)


def _upstream_message(raw: bytes, reason: str) -> str:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return clipped(raw.decode(errors="replace"), ERROR_PAGE_CHARS) or reason
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return clipped(str(error.get("message") or error))
    if isinstance(error, str):
        return clipped(error)
    if isinstance(data, dict):
        return clipped(str(data.get("detail") or data))
    return clipped(str(data))


def _retry_after(value: str | None) -> str:
    """A backend's Retry-After as whole seconds, 1 to 3600 (1 when absent or a date)."""
    seconds = int(value) if value and value.strip().isdigit() else 1
    return str(min(max(seconds, 1), 3600))


def check_status(
    status: int, raw: bytes, reason: str, model_id: str, retry_after: str | None = None
) -> None:
    if status < 300:
        return
    if status < 400:
        raise UpstreamError(
            f"model {model_id!r} backend answered with a redirect (HTTP {status}), "
            "which the gateway does not follow"
        )
    message = _upstream_message(raw, reason)
    if status in (400, 413, 422):
        # The backend refused the request itself (too long a prompt, bad field): the
        # client's to fix, so it is theirs as a 400.
        raise UpstreamError(f"model {model_id!r} rejected the request: {message}", 400)
    if status == 429:
        # Rate limited (a hosted backend): the client may back off and retry, as it would
        # with the backend itself.
        raise UpstreamError(
            f"model {model_id!r} backend is rate limited: {message}",
            429,
            headers={"Retry-After": _retry_after(retry_after)},
        )
    raise UpstreamError(f"model {model_id!r} backend failed with HTTP {status}: {message}")


async def call_json(adm: Admission, path: str, body: dict[str, Any]) -> dict[str, Any]:
    data, _raw = await call_upstream(adm, path, body)
    return data


async def call_upstream(
    adm: Admission, path: str, body: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    """The backend's JSON answer, parsed (to check it and read its usage) and as it came (to
    pass on without encoding it again: an embeddings answer can be megabytes)."""
    registry = adm.gateway.backends
    try:
        async with await registry.post(adm.backend, path, upstream_body(adm, body)) as response:
            status, reason = response.status, response.reason or ""
            retry_after = response.headers.get("Retry-After")
            if status < 300:
                raw = await read_capped(response, adm.gateway.max_answer_bytes)
            else:
                raw = await response.content.read(ERROR_BODY_BYTES)
    except UPSTREAM_ERRORS as exc:
        raise UpstreamError(unreachable(adm, exc)) from None
    check_status(status, raw, reason, adm.model.id, retry_after)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # a backend's JSON can be nested past the stack
        raise UpstreamError(
            f"model {adm.model.id!r} backend sent a body that is not JSON"
        ) from None
    if not isinstance(data, dict):
        raise UpstreamError(f"model {adm.model.id!r} backend sent an unexpected body")
    return data, raw


async def open_stream(
    adm: Admission, path: str, body: dict[str, Any], request: Request | None = None
) -> aiohttp.ClientResponse:
    """The backend's answer to a stream, once its headers say it is one; ``ClientGone`` when
    ``request``'s client leaves before those came."""
    registry = adm.gateway.backends
    payload = upstream_body(adm, body)
    payload["stream"] = True
    payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    try:
        posting = registry.post(adm.backend, path, payload)
        response = await (posting if request is None else unless_gone(request, posting))
    except UPSTREAM_ERRORS as exc:
        raise UpstreamError(unreachable(adm, exc)) from None
    status = response.status
    events = response.content_type == "text/event-stream"
    if status >= 300 or not events:
        try:
            raw = await response.content.read(ERROR_BODY_BYTES)
        except UPSTREAM_ERRORS:
            raw = b""
        finally:
            response.release()
        check_status(
            status, raw, response.reason or "", adm.model.id, response.headers.get("Retry-After")
        )
        # An HTML page, or a whole completion from a backend that ignored ``stream``: not
        # to be relayed as if it were events.
        raise UpstreamError(
            f"model {adm.model.id!r} backend answered a stream with {response.content_type}, "
            "not text/event-stream"
        )
    return response


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``OversizedAnswer`` as soon as it passes ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise OversizedAnswer(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise OversizedAnswer(limit)
        parts.append(chunk)
    return b"".join(parts)


async def sse_blocks(response: aiohttp.ClientResponse, limit: int) -> AsyncIterator[bytes]:
    """The server-sent events completed by each read from the upstream, as one block ending
    in a blank line, as soon as that read arrives: events that came in together leave together.
    An event still unfinished past ``limit`` bytes raises ``OversizedAnswer``.

    Hand-written: an SSE client library would re-encode the events we pass through unchanged.
    """
    buffer = bytearray()
    async for chunk in response.content.iter_any():
        if not buffer and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            yield chunk  # the usual read: whole events, passed on without a copy
            continue
        # Only the new bytes are looked at, with the last old one (a CR or LF of the old end
        # pairs with new ones): rescanning an unfinished event at each read is quadratic.
        start = max(0, len(buffer) - 1)
        buffer += chunk
        if b"\r" in buffer[start:]:
            tail = buffer[start:].replace(b"\r\n", b"\n")
            del buffer[start:]
            buffer += tail
        end = buffer.rfind(b"\n\n", start)
        if end >= 0:
            with memoryview(buffer) as view:  # one copy of the events, where a slice is two
                block = bytes(view[: end + 2])
            del buffer[: end + 2]
            yield block
        elif len(buffer) > limit:
            raise OversizedAnswer(limit)
    if buffer.strip():
        yield bytes(buffer.strip()) + b"\n\n"


async def sse_batches(response: aiohttp.ClientResponse, limit: int) -> AsyncIterator[list[bytes]]:
    """Like ``sse_blocks``, split into events (without the blank line ending each)."""
    async for block in sse_blocks(response, limit):
        batch = [event for event in block.split(b"\n\n") if event]
        if batch:
            yield batch


def event_json(event: bytes) -> Any:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return None
            try:
                return json.loads(payload)
            except (ValueError, RecursionError):
                return None
    return None


def is_done(event: bytes) -> bool:
    """Whether ``event`` ends the stream: its data is ``[DONE]``, however it is written."""
    if event.startswith(DONE):
        return True
    if DONE_DATA not in event:
        return False
    data = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(d[1:] if d.startswith(b" ") else d for d in data).strip() == DONE_DATA


def special_start(block: bytes) -> int:
    """Where the first event of ``block`` that may end the stream, report an error or carry a
    usage that is not null begins, or -1. The events before it are content deltas, passed on
    as they came."""
    cut = block.find(DONE_DATA)
    error = block.find(ERROR)
    if error >= 0 and (cut < 0 or error < cut):
        cut = error
    at = block.find(USAGE)
    while at >= 0 and (cut < 0 or at < cut):
        if not block[at + len(USAGE) : at + len(USAGE) + 8].lstrip(b": ").startswith(b"null"):
            cut = at
            break
        at = block.find(USAGE, at + len(USAGE))
    if cut < 0:
        return -1
    end = block.rfind(b"\n\n", 0, cut)
    return 0 if end < 0 else end + 2


def has_usage(event: bytes) -> bool:
    return b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event


class StreamState:
    """What a relayed stream has told us: usage, chunks, whether it ended properly."""

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.chunks = 0
        self.done = False
        self.error: str | None = None
        self.client_gone = False
        self.stalled = False  # the client stopped reading and the relay was ended
        self.cancelled = False  # the server cancelled the relay: it is shutting down
        # Set by the relayed generator just before it yields its final block, which then
        # ends the response body in the same write.
        self.last = False

    def take_usage(self, data: Any) -> None:
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.input_tokens, self.output_tokens = usage_counts(usage)

    @property
    def status(self) -> int:
        if self.stalled:
            return STALLED
        if self.cancelled and not self.client_gone:
            return CANCELLED
        if self.client_gone or not (self.done or self.error):
            return 499  # the client went away mid-stream
        return 502 if self.error else 200

    @property
    def billed_output(self) -> int:
        return self.output_tokens or self.chunks


async def openai_events(
    adm: Admission,
    response: aiohttp.ClientResponse,
    state: StreamState,
    client_wants_usage: bool,
) -> AsyncIterator[bytes]:
    """The upstream's events, untouched, minus the usage-only chunk the client did not ask for."""
    try:
        async for block in sse_blocks(response, adm.gateway.max_answer_bytes):
            start = special_start(block)
            if start < 0:
                # Most reads carry content deltas only: they leave as they came, in one write.
                state.chunks += block.count(b"\n\n")
                yield block
                continue
            # A stream's last read usually holds all of it: only its tail is looked into.
            state.chunks += block.count(b"\n\n", 0, start)
            # Joined once at the end: a big event is copied once, not at each step.
            out: list[bytes | memoryview] = [memoryview(block)[:start]]
            for event in block[start:].split(b"\n\n"):
                if not event:
                    continue
                if is_done(event):
                    state.done = True
                    out.append(DONE + b"\n\n")
                    break
                if ERROR in event and (failure := reported(adm, data := event_json(event))):
                    state.error = failure  # passed on, masked; the stream counts as failed
                    event = masked_error(data)
                if has_usage(event):
                    data = event_json(event)
                    state.take_usage(data)
                    if (
                        not client_wants_usage
                        and isinstance(data, dict)
                        and not data.get("choices")
                    ):
                        continue
                state.chunks += 1
                out += (event, b"\n\n")
            joined = b"".join(out)
            if state.done:
                state.last = True
                yield joined
                return
            if joined:
                yield joined
    except UPSTREAM_ERRORS as exc:
        state.error = died(adm, exc)
    if not state.done:
        state.error = state.error or f"the backend of model {adm.model.id!r} ended the stream early"
        error = {"error": {"message": state.error, "type": "server_error", "code": "upstream"}}
        state.last = True
        yield b"data: " + json.dumps(error).encode() + b"\n\n" + DONE + b"\n\n"


_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Sweeper:
    """The streams being relayed on one event loop, looked at every ``SEND_STALL_S / 2`` by
    one timer for them all while there are any (a timer per stream costs each a few µs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.relays: set[RelayResponse] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, relay: RelayResponse) -> None:
        self.relays.add(relay)
        if self.timer is None:
            self.timer = self.loop.call_later(SEND_STALL_S / 2, self.sweep)

    def sweep(self) -> None:
        self.timer = None
        for relay in list(self.relays):
            relay.check_stall()
        if self.relays:
            self.timer = self.loop.call_later(SEND_STALL_S / 2, self.sweep)


_local = threading.local()  # one event loop runs per thread: its sweeper


def _sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    sweeper: _Sweeper | None = getattr(_local, "sweeper", None)
    if sweeper is None or sweeper.loop is not loop:
        sweeper = _local.sweeper = _Sweeper(loop)
    return sweeper


class RelayResponse(Response):
    """Relays ``content`` as it comes. However the stream ends (finished, failed, client gone,
    client no longer reading) it closes the upstream response and runs ``on_close`` exactly
    once: that releases the slot and bills usage.

    Plain ASGI rather than Starlette's StreamingResponse: one task watches for the client
    leaving (and then closes the upstream, which ends the relay) instead of an anyio task
    group per stream. A client that stays but stops reading leaves a send waiting on the
    server's write buffer: each send is noted (``pending``) and a timer shared by all streams
    ends a relay whose same send is still waiting after ``SEND_STALL_S``, rather than a
    deadline per send. It drops the connection where the server offers that
    (``core/http/protocol.py``), and otherwise cancels the relay's task.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        upstream: aiohttp.ClientResponse,
        state: StreamState,
        on_close: Callable[[], None],
        *,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status_code = status
        self.background = None
        self.raw_headers = list(_STREAM_HEADERS if headers is None else headers)
        self.content = content
        self.upstream = upstream
        self.state = state
        self.on_close = on_close
        self.pending: dict[str, Any] | None = None  # the message a send is under way with
        self._seen: dict[str, Any] | None = None
        self._stuck = 0
        self._cancelling = 0
        self._abort: Callable[[], None] | None = None  # drops the connection, where served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
        sweeper = _sweeper(task.get_loop())
        sweeper.add(self)
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            message: dict[str, Any] = {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
            self.pending = message
            await send(message)
            self.pending = None
            async for chunk in self.content:
                more = not self.state.last
                message = {"type": "http.response.body", "body": chunk, "more_body": more}
                self.pending = message
                await send(message)
                self.pending = None
            if self.state.error is not None and not self.state.last and self._abort is not None:
                # Content that failed without saying so in the body: a proper end of it would
                # pass the cut-off answer for a whole one.
                self._abort()
                return
            if not self.state.last:
                self.pending = message = {"type": "http.response.body", "body": b""}
                await send(message)
        except asyncio.CancelledError:
            # Ours (see check_stall) unless the task was cancelled by someone else as well.
            if not self.state.stalled or self._task.uncancel() > self._cancelling:
                self.state.cancelled = True
                raise
            # Returning with the response unfinished makes the server close the connection.
        finally:
            sweeper.relays.discard(self)
            watcher.cancel()
            try:
                # Back to the pool when the body was read to its end, else closed.
                self.upstream.release()
            finally:
                self.on_close()

    def check_stall(self) -> None:
        """Called every ``SEND_STALL_S / 2``: ends the relay when the same send was under way
        at the last two calls too."""
        pending = self.pending
        if pending is None or pending is not self._seen:
            self._seen, self._stuck = pending, 0
            return
        self._stuck += 1
        if self._stuck < 2 or self.state.stalled:
            return
        self.state.stalled = True
        self.upstream.close()
        if self._abort is not None:
            # The server then sees the connection lost: the waiting send returns, the watcher
            # ends the relay, and the socket and its buffers go at once.
            self._abort()
            return
        self._cancelling = self._task.cancelling()
        self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.state.client_gone = True
        self.upstream.close()


def stream_response(
    adm: Admission,
    upstream: aiohttp.ClientResponse,
    content: AsyncIterator[bytes],
    state: StreamState,
) -> RelayResponse:
    def close() -> None:
        if state.stalled:
            log.warning(
                "stream ended: the client accepted nothing for too long",
                model=adm.model.id,
                user=adm.usage.username,
                after_s=SEND_STALL_S,
            )
        adm.finish(state.status, state.input_tokens, state.billed_output)

    return RelayResponse(content, upstream, state, close)
