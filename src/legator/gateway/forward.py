"""``/v1`` requests for a model that another replica serves, forwarded to that replica.

The replica that serves a model (the one that runs its managed backend, or the model's home
among the replicas: ``homes.py``) holds its slots and queue: the others pass each request on
as it came (the client's key included, which that replica checks again against the shared
database) and relay the answer as it arrives. A forwarded request carries ``FORWARDED`` (a
token only replicas know); a replica never forwards such a one again, so two replicas with
different views of who serves a model cannot bounce it between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from legator.core.http.errors import error_response
from legator.core.logging import get_logger
from legator.gateway.relay import UPSTREAM_ERRORS, RelayResponse, StreamState
from legator.gateway.service import FORWARDED, ForwardToReplica, Gateway

log = get_logger("legator.gateway.forward")

# What a client's request may carry on to the owner: its credential and what shapes the answer.
_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "content-type",
        "accept",
        "anthropic-version",
        "anthropic-beta",
        "user-agent",
    }
)
# What of the owner's answer reaches the client; our own middleware adds the rest.
_RESPONSE_HEADERS = frozenset(
    {"content-type", "retry-after", "www-authenticate", "cache-control", "x-accel-buffering"}
)


async def forward(request: Request, exc: Exception) -> Response:
    """The app's handler for ``ForwardToReplica``: the serving replica's answer, relayed as it
    comes."""
    assert isinstance(exc, ForwardToReplica)
    gateway: Gateway = request.app.state.gateway
    headers = {k: v for k, v in request.headers.items() if k in _REQUEST_HEADERS}
    headers[FORWARDED] = gateway.forwarding_token
    url = exc.url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    try:
        upstream = await gateway.backends.session.post(
            url, data=await request.body(), headers=headers, allow_redirects=False
        )
    except UPSTREAM_ERRORS as error:
        log.warning(
            "forwarding failed",
            model=exc.model_id,
            replica=exc.replica,
            url=exc.url,
            error=type(error).__name__,
        )
        if gateway.homes is not None:
            gateway.homes.unreachable(exc.replica)  # the next requests are served here
        return error_response(
            request,
            503,
            # Not its URL: clients have no business with the replicas' internal addresses.
            f"model {exc.model_id!r} is served by replica {exc.replica!r}, which did not answer",
            headers={"Retry-After": "5"},
        )
    gateway.metrics.forwarded.labels(exc.replica).inc()
    state = StreamState()
    return RelayResponse(
        _body(upstream, state),
        upstream,
        state,
        on_close=lambda: None,  # the serving replica holds the slot and bills the usage
        status=upstream.status,
        headers=[
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in upstream.headers.items()
            if name.lower() in _RESPONSE_HEADERS
        ],
    )


async def _body(upstream: aiohttp.ClientResponse, state: StreamState) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
        state.done = True
    except UPSTREAM_ERRORS as exc:
        # The response has begun: the client learns of the failure by the connection ending
        # without a proper end of the body.
        state.error = f"the replica serving this request failed mid-answer: {type(exc).__name__}"
        log.warning("forwarded answer cut off", error=type(exc).__name__)
