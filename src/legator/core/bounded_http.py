"""Requests whose answers are read within a size and a time, for clients of servers they need
not trust (leger's control plane, legerd): a hostile or broken server, or a proxy in between,
can neither make the client hold more than the limit nor keep it waiting for ever.

Client-side only, and light to import (httpx alone): programs that embed the secrets client
load it too."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore
import httpx

T = TypeVar("T")

MAX_ERROR_BYTES = 64 * 1024
"""The most read of an error answer; only the start of its message is shown."""
REQUEST_DEADLINE = 300.0
"""Seconds a whole answer may take, from sending the request to the last byte of the body,
status line and headers included. A client's ``timeout`` bounds each wait for more bytes
only: a server dripping a byte at a time could otherwise hold it for ever."""


class BodyTooLarge(Exception):
    """An answer past its limit, refused while it was still arriving."""


class BodyTooSlow(Exception):
    """An answer (head or body) that did not arrive within ``REQUEST_DEADLINE``."""


@dataclass
class _Deadline:
    at: float  # time.monotonic() when the answer is given up
    expired: bool = False  # a read, write or connect stopped short at ``at``


_current: ContextVar[_Deadline | None] = ContextVar("bounded_http_deadline", default=None)


def _within_deadline(
    call: Callable[[float | None], T],
    timeout: float | None,
    late: type[httpcore.TimeoutException],
) -> T:
    """``call(timeout)``, its timeout cut to what is left of the current request's deadline
    (none outside ``bounded_request``). ``late``: the httpcore timeout raised once past it."""
    deadline = _current.get()
    if deadline is None:
        return call(timeout)
    left = deadline.at - time.monotonic()
    if left <= 0:
        deadline.expired = True
        raise late("past the deadline of the whole answer")
    if timeout is not None and timeout <= left:
        return call(timeout)  # the client's own timeout comes first
    try:
        return call(left)
    except httpcore.TimeoutException:
        deadline.expired = True
        raise


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every wait ends by the deadline of the request it serves."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _within_deadline(
            lambda t: self._inner.read(max_bytes, t), timeout, httpcore.ReadTimeout
        )

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _within_deadline(lambda t: self._inner.write(buffer, t), timeout, httpcore.WriteTimeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            _within_deadline(
                lambda t: self._inner.start_tls(ssl_context, server_hostname, t),
                timeout,
                httpcore.ConnectTimeout,
            )
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """Opens ``_DeadlineStream`` connections, and connects within the deadline too."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = _within_deadline(
            lambda t: self._inner.connect_tcp(host, port, t, local_address, socket_options),
            timeout,
            httpcore.ConnectTimeout,
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = _within_deadline(
            lambda t: self._inner.connect_unix_socket(path, t, socket_options),
            timeout,
            httpcore.ConnectTimeout,
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bound_connections(http: httpx.Client) -> None:
    """Make the connection pools of ``http``'s transports open ``_DeadlineStream``s, once.
    httpx offers no public way to reach them; a transport built otherwise (a mock, a
    custom one) is left as it is, and only its body is bounded in time."""
    for transport in (http._transport, *http._mounts.values()):
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend) and not isinstance(
            backend, _DeadlineBackend
        ):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]


def origin(url: httpx.URL | str) -> str:
    """``scheme://host[:port]`` of a URL: the server a message names."""
    url = httpx.URL(str(url))
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def not_json(response: httpx.Response, expected: str = "JSON") -> str:
    """One line for an answer that is not the API's JSON (an SSO page, a proxy's error), or
    not the ``expected`` other thing."""
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "text/html" or response.content.lstrip()[:1] == b"<":
        what = "an HTML page: a proxy in front?"
    elif response.is_redirect:
        what = f"a redirect to {response.headers.get('location', '?')}: a sign-in proxy in front?"
    else:
        what = f"HTTP {response.status_code}, {kind or 'no content type'}"
    return f"{origin(response.request.url)} did not answer with {expected} ({what})"


def size_text(limit: int) -> str:
    """``1 MiB``, ``64 KiB`` or ``300 bytes``: a limit as people read it."""
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if limit >= factor and limit % factor == 0:
            return f"{limit // factor} {unit}"
    return f"{limit} bytes"


def _read_body(response: httpx.Response, limit: int, give_up_at: float, deadline: float) -> bytes:
    """The body, read a chunk at a time. A success answer past ``limit`` bytes is refused;
    an error answer is cut at ``MAX_ERROR_BYTES`` (only its message is shown)."""
    failed = response.is_error or response.is_redirect
    cap = MAX_ERROR_BYTES if failed else limit
    where = f"{response.request.method} {response.request.url.path}"
    declared = response.headers.get("content-length", "")
    if not failed and declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge(
            f"{where}: the answer is {declared} bytes, over the {size_text(cap)} accepted"
        )
    body = bytearray()
    # Each piece as it arrives (a network read, at most 64 KiB before decoding). Decoded bytes
    # are counted, so a compressed answer cannot expand past the limit either.
    for chunk in response.iter_bytes():
        if time.monotonic() > give_up_at:
            raise BodyTooSlow(f"{where}: no complete answer within {deadline:g} s; gave up")
        body += chunk
        if len(body) > cap:
            if failed:
                return bytes(body[:cap])
            raise BodyTooLarge(
                f"{where}: the answer is over the {size_text(cap)} accepted; "
                "stopped reading it there"
            )
    return bytes(body)


def bounded_request(
    http: httpx.Client, method: str, path: str, *, limit: int, **kwargs: Any
) -> httpx.Response:
    """The answer with its body read: at most ``limit`` bytes of it, the whole answer (status
    line and headers included) within ``REQUEST_DEADLINE`` seconds. ``BodyTooLarge``,
    ``BodyTooSlow``, or httpx's errors for a server out of reach."""
    seconds = REQUEST_DEADLINE  # read at each call: one setting for every client
    deadline = _Deadline(time.monotonic() + seconds)
    _bound_connections(http)
    token = _current.set(deadline)
    try:
        with http.stream(method, path, **kwargs) as streamed:
            body = _read_body(streamed, limit, deadline.at, seconds)
    except httpx.TimeoutException as exc:
        if not deadline.expired:
            raise
        where = f"{method} {_path_of(exc, path)}"
        raise BodyTooSlow(f"{where}: no complete answer within {seconds:g} s; gave up") from None
    finally:
        _current.reset(token)
    # The body is already decoded: the encoding and length headers no longer describe it.
    stale = {"content-encoding", "content-length", "transfer-encoding"}
    headers = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() not in stale]
    return httpx.Response(
        streamed.status_code, headers=headers, content=body, request=streamed.request
    )


def _path_of(error: httpx.HTTPError, path: str) -> str:
    """The path of the request ``error`` is about, else the one asked for."""
    try:
        return error.request.url.path
    except RuntimeError:  # httpx had not attached the request
        return path
