"""The one ASGI middleware on every request: request id, security headers, metrics, access log.

Written as plain ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task switch
and a copy of every body; this is on the hot path of every call.
"""

from __future__ import annotations

import logging
import random
import re
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from legator.core.context import request_id_var
from legator.core.http.errors import error_response
from legator.core.logging import get_logger
from legator.core.metrics import Labelled, Metrics

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}\Z")
_STRICT_CSP = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# The API docs page loads its viewer from a CDN.
_DOCS_CSP = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    b"style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
    b"frame-ancestors 'none'"
)
_COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # Nothing to other sites; our own pages' form posts (sign-out) then carry their Origin,
    # which a cookie-authenticated write must (no-referrer made browsers send "null").
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

access_logger = get_logger("legator.access")
# Request ids only correlate log lines (a client may send its own): they need to be unique,
# not unpredictable, so they come from a fast generator seeded from the OS, not os.urandom.
_request_ids = random.Random()  # noqa: S311


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, *, access_log: bool = True
    ) -> None:
        self.app = app
        # Decided once: logging is configured before the app takes its first request.
        self.access_log = access_log and access_logger.is_enabled_for(logging.INFO)
        self.requests = Labelled(metrics.http_requests)
        self.latency = Labelled(metrics.http_latency)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = ""
        declared_length = 0
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared_length = int(value)
        if _VALID_REQUEST_ID.match(incoming):
            request_id = incoming
        else:
            request_id = f"{_request_ids.getrandbits(128):032x}"
        token = request_id_var.set(request_id)
        path: str = scope["path"]
        https = scope.get("scheme") in ("https", "wss")
        status = 500
        response_started = False
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(_COMMON_HEADERS)
                headers.append(
                    (
                        b"content-security-policy",
                        _DOCS_CSP if path == "/api/v1/docs" else _STRICT_CSP,
                    )
                )
                if path.startswith("/api/"):
                    headers.append((b"cache-control", b"no-store"))
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        received = 0
        limit = self.max_body_bytes

        async def receive_with_limit() -> Message:
            # Bodies without a Content-Length are counted as they stream in; the handler
            # for HTTPException turns this into the usual error shape.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over {limit} bytes")
            return message

        try:
            if declared_length > limit:
                # Refuse before reading a byte.
                too_large = error_response(Request(scope), 413, f"request body over {limit} bytes")
                await too_large(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive_with_limit, send_with_headers)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler so that the reply
            # still carries the request id and the security headers.
            access_logger.error("unhandled error", path=path, exc_info=exc)
            if response_started or scope["type"] != "http":
                raise
            failure = error_response(
                Request(scope), 500, "internal error; the request id identifies it in the log"
            )
            await failure(scope, receive, send_with_headers)
        finally:
            if scope["type"] == "http":
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                method = scope["method"]
                self.requests(template, method, str(status)).inc()
                self.latency(template, method).observe(elapsed)
                if self.access_log and path not in _QUIET_PATHS:
                    access_logger.info(
                        "request",
                        method=method,
                        path=path,
                        status=status,
                        ms=round(elapsed * 1000, 2),
                    )
            request_id_var.reset(token)
