"""Requests whose answers are read within a size and a time, for clients of servers they need
not trust (leger's control plane, legerd): a hostile or broken server, or a proxy in between,
can neither make the client hold more than the limit nor keep it waiting for ever.

Client-side only, and light to import (httpx alone): programs that embed the secrets client
load it too."""

from __future__ import annotations

import time
from typing import Any

import httpx

MAX_ERROR_BYTES = 64 * 1024
"""The most read of an error answer; only the start of its message is shown."""
REQUEST_DEADLINE = 300.0
"""Seconds an answer's body may take to arrive in all. A client's ``timeout`` bounds each
wait for more bytes only: a server dripping a byte at a time could otherwise hold it for
ever. (The status line and headers are bounded by h11's size limit and that timeout.)"""


class BodyTooLarge(Exception):
    """An answer past its limit, refused while it was still arriving."""


class BodyTooSlow(Exception):
    """An answer whose body did not arrive within ``REQUEST_DEADLINE``."""


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
    """The answer with its body read: at most ``limit`` bytes of it, within
    ``REQUEST_DEADLINE`` seconds. ``BodyTooLarge``, ``BodyTooSlow``, or httpx's errors for a
    server out of reach."""
    deadline = REQUEST_DEADLINE  # read at each call: one setting for every client
    with http.stream(method, path, **kwargs) as streamed:
        body = _read_body(streamed, limit, time.monotonic() + deadline, deadline)
    # The body is already decoded: the encoding and length headers no longer describe it.
    stale = {"content-encoding", "content-length", "transfer-encoding"}
    headers = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() not in stale]
    return httpx.Response(
        streamed.status_code, headers=headers, content=body, request=streamed.request
    )
