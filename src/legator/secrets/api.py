"""legerd's HTTP surface: setec's ``/api/*`` calls and the HTML index, byte for byte.

Written on Starlette directly (no FastAPI dependency injection): every call has setec's own
checks (POST, JSON, the anti-browser header) and short plain-text errors, and a get must stay
well under a millisecond.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio.to_thread
import jinja2
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from legator.core.auth.tailscale import WhoIs, cache_key
from legator.core.logging import get_logger
from legator.secrets.acl import Policy
from legator.secrets.errors import SecretsError
from legator.secrets.identity import (
    DEV_CALLER,
    Caller,
    IdentityError,
    PeerCred,
    caller_from_whois,
    from_this_host,
    is_loopback,
    unix_caller,
    unmapped,
)
from legator.secrets.ratelimit import Limiter
from legator.secrets.service import SecretsService
from legator.secrets.wire import (
    field_bool,
    field_bytes,
    field_int,
    field_str,
    info_json,
    value_json,
)

log = get_logger("legerd")
_INDEX = jinja2.Environment(autoescape=True).from_string(
    "<!doctype html><html><head><meta charset=utf-8><title>legerd</title></head><body>"
    "<h1>Secrets visible to {{ principal }}</h1><table><thead><tr><th>Name</th>"
    "<th>Active version</th><th>Versions</th></tr></thead><tbody>"
    "{% for s in secrets %}<tr><td>{{ s.name }}</td><td>{{ s.active_version }}</td>"
    "<td>{{ s.versions | join(', ') }}</td></tr>{% endfor %}</tbody></table></body></html>"
)
PEER_STATE_KEY = "legerd_peer"
NO_BROWSERS_HEADER = "sec-x-tailscale-no-browsers"
# A 1 MiB value is 1.4 MiB of base64; anything much larger is not a setec request.
MAX_BODY_BYTES = 2 << 20


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def text_error(status: int, message: str) -> Response:
    # Go's http.Error: text/plain, nosniff, the message and a newline.
    return Response(
        message + "\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def json_response(body: Any) -> Response:
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")


NOT_MODIFIED = Response(status_code=304, headers={"Content-Type": "application/json"})


def from_a_browser(request: Request) -> bool:
    """Whether the request carries a header only browsers send. ``/`` and ``/metrics`` do not
    require setec's anti-browser header (Prometheus cannot send it), so a page whose DNS was
    rebound to legerd's address could otherwise read them with its visitor's identity."""
    return any(key == "origin" or key.startswith("sec-fetch-") for key in request.headers)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8573`` is ``::1``."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.lower().rstrip(".")


def host_allowed(request: Request, allowed: frozenset[str]) -> bool:
    """Whether legerd answers a request with this Host: any, when no names are configured;
    else those names, IP literals and ``localhost``; any on the unix socket."""
    if not allowed or PEER_STATE_KEY in request.scope.get("state", {}):
        return True
    host = request.headers.get("host")
    if host is None:  # HTTP/1.0: no browser sends none
        return True
    name = host_name(host)
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def source_of(request: Request) -> str:
    """What the rate limit counts calls by: the peer's uid on the unix socket, else its
    address (one per tailnet node), both known before the caller is identified."""
    peer: PeerCred | None = request.scope.get("state", {}).get(PEER_STATE_KEY)
    if peer is not None:
        return f"uid:{peer.uid}"
    client = request.scope.get("client")
    return unmapped(client[0]) if client else "unknown"


def throttled(limiter: Limiter, source: str, wait: float) -> Response:
    if limiter.tracks(source):
        message = (
            f"rate limit exceeded: at most {limiter.limit.per_second:g} calls a second from one "
            f"caller after a burst of {limiter.limit.burst}; retry in {math.ceil(wait)} s"
        )
    else:  # every bucket is in use by another source
        message = (
            f"rate limit exceeded: calls from {limiter.limit.max_sources} other callers are being "
            f"counted, the most legerd counts at once; retry in {math.ceil(wait)} s"
        )
    response = text_error(429, message)
    response.headers["Retry-After"] = str(math.ceil(wait))
    return response


class ThrottleLog:
    """A warning when a source is throttled, at most once a minute per source: the metrics
    count every refusal, the log says who."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def note(self, source: str, *, crowded: bool = False) -> None:
        """``crowded``: refused as a new source while every bucket is in use; one line a
        minute for all of them, however many addresses they come from."""
        key = "" if crowded else source
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = now
        if crowded:
            log.warning("new caller refused: the rate limit counts too many callers", source=source)
        else:
            log.warning("caller rate-limited", source=source)


BROWSER_REFUSED = "access denied: legerd does not answer browsers (Origin or Sec-Fetch-* header)"
HOST_REFUSED = "access denied: legerd does not answer to this Host name (see allowed hosts)"


class SharedWhois:
    """One ``whois`` in flight per node (``cache_key``): the connections a new node opens at
    once (a host starting its services) wait for the same answer instead of each asking
    tailscaled. A failure is not kept: the next caller after it asks again. Only used from
    the event loop's thread."""

    def __init__(self, whois: WhoIs) -> None:
        self.whois = whois
        self._pending: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def lookup(self, addr: str) -> dict[str, Any]:
        key = cache_key(addr)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self.whois.whois(addr))
            self._pending[key] = task
            task.add_done_callback(partial(self._finished, key))
        # Shielded: a caller that hangs up cancels its own wait, not the others' lookup.
        return await asyncio.shield(task)

    def _finished(self, key: str, task: asyncio.Task[dict[str, Any]]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every waiter hung up meanwhile


class Identifier:
    def __init__(self, policy: Policy, whois: WhoIs | None, dev: bool) -> None:
        self.policy = policy
        self.whois = whois
        self.dev = dev
        self._shared = SharedWhois(whois) if whois is not None else None

    async def identify(self, request: Request) -> Caller:
        peer: PeerCred | None = request.scope.get("state", {}).get(PEER_STATE_KEY)
        if peer is not None:
            return DEV_CALLER if self.dev else unix_caller(peer, self.policy)
        client = request.scope.get("client")
        if not client:
            raise IdentityError("caller has no address and no peer credentials")
        host, port = unmapped(client[0]), client[1]
        if self.dev and is_loopback(host):
            return DEV_CALLER
        if self._shared is None:
            raise IdentityError("no Tailscale LocalAPI socket is configured")
        server = request.scope.get("server")
        if from_this_host(host, unmapped(server[0]) if server else None):
            raise IdentityError(
                "the caller runs on legerd's own host, for which tailscaled would name the "
                "host rather than its user: local callers use the unix socket"
            )
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return caller_from_whois(await self._shared.lookup(addr), self.policy)


Handler = Callable[[SecretsService, Caller, dict[str, Any]], Awaitable[Response]]


def _list_body(svc: SecretsService, caller: Caller) -> Response:
    return json_response([info_json(i) for i in svc.list(caller)])


async def _list(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    # Off the event loop: a list reads and filters every secret (150 ms for 10,000), and a
    # caller asking for it again and again would hold every other caller's get that long.
    return await anyio.to_thread.run_sync(_list_body, svc, caller)


async def _get(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    result = svc.get(
        caller,
        field_str(body, "Name"),
        field_int(body, "Version"),
        field_bool(body, "UpdateIfChanged"),
    )
    return json_response(value_json(result.value, result.version))


async def _info(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    return json_response(info_json(svc.info(caller, field_str(body, "Name"))))


async def _put(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    name, value = field_str(body, "Name"), field_bytes(body, "Value")
    version = await anyio.to_thread.run_sync(svc.put, caller, name, value)
    return json_response(version)


async def _activate(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    name, version = field_str(body, "Name"), field_int(body, "Version")
    await anyio.to_thread.run_sync(svc.activate, caller, name, version)
    return json_response({})


async def _delete(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    await anyio.to_thread.run_sync(svc.delete, caller, field_str(body, "Name"))
    return json_response({})


async def _delete_version(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    name, version = field_str(body, "Name"), field_int(body, "Version")
    await anyio.to_thread.run_sync(svc.delete_version, caller, name, version)
    return json_response({})


async def _create_version(svc: SecretsService, caller: Caller, body: dict[str, Any]) -> Response:
    name, version = field_str(body, "Name"), field_int(body, "Version")
    value = field_bytes(body, "Value")
    await anyio.to_thread.run_sync(svc.create_version, caller, name, version, value)
    return json_response({})


CALLS: dict[str, Handler] = {
    "list": _list,
    "get": _get,
    "info": _info,
    "put": _put,
    "activate": _activate,
    "delete": _delete,
    "delete-version": _delete_version,
    "create-version": _create_version,
    "set-active": _activate,  # the name older setec clients use for activate
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "legerd_api_calls",
            "setec API calls by call and HTTP status.",
            ["call", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "legerd_api_call_seconds",
            "Time to answer a setec API call.",
            ["call"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )


def create_legerd_app(
    service: SecretsService,
    identifier: Identifier,
    allowed_hosts: frozenset[str] = frozenset(),
    limiter: Limiter | None = None,
) -> Starlette:
    """``allowed_hosts``: the Host names TCP callers may use besides IP literals and
    ``localhost`` (none: any). ``limiter``: the request rate per source (none: no limit)."""
    metrics = Metrics()
    throttle_log = ThrottleLog()

    def refused(request: Request, *, browsers_too: bool) -> Response | None:
        if not host_allowed(request, allowed_hosts):
            return text_error(403, HOST_REFUSED)
        if limiter is not None and (wait := limiter.wait(source := source_of(request))):
            throttle_log.note(source, crowded=not limiter.tracks(source))
            return throttled(limiter, source, wait)
        if browsers_too and from_a_browser(request):
            return text_error(403, BROWSER_REFUSED)
        return None

    async def api_call(request: Request) -> Response:
        # No browser check: setec's anti-browser header, which no page can set, is required.
        call = request.path_params["call"]
        if (refusal := refused(request, browsers_too=False)) is not None:
            if refusal.status_code == 429 and call in CALLS:  # known calls only: bounded labels
                metrics.calls.labels(call, "429").inc()
            return refusal
        handler = CALLS.get(call)
        if handler is None:
            return text_error(404, "404 page not found")
        started = time.perf_counter()
        response = await _answer(request, handler)
        metrics.calls.labels(call, str(response.status_code)).inc()
        metrics.seconds.labels(call).observe(time.perf_counter() - started)
        return response

    async def _answer(request: Request, handler: Handler) -> Response:
        if request.method != "POST":
            return text_error(400, "only POST requests allowed")
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media != "application/json":
            return text_error(400, "request body must be json")
        if request.headers.get(NO_BROWSERS_HEADER) != "setec":
            return text_error(403, "access denied")
        try:
            caller = await identifier.identify(request)
        except IdentityError as exc:
            log.warning(
                "cannot identify caller", client=request.scope.get("client"), error=str(exc)
            )
            return text_error(500, "unable to identify caller")
        try:
            body = json.loads(await read_body(request))
        except BodyTooLarge:
            return text_error(400, "bad request: body larger than 2 MiB")
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
            return text_error(400, "bad request")
        if body is None:
            body = {}  # as Go decodes null into a request struct: setec documents it for list
        if not isinstance(body, dict):
            return text_error(400, "bad request")
        try:
            return await handler(service, caller, body)
        except SecretsError as exc:
            if exc.status_code == 304:
                return NOT_MODIFIED
            if exc.status_code >= 500:
                # The detail (e.g. which row failed authentication) is for the operator.
                log.error("secrets call failed", error=exc.message, principal=caller.principal)
                return text_error(500, "internal error")
            return text_error(exc.status_code, exc.message)
        except Exception:  # setec answers any other failure the same way; the trace is logged
            log.exception("secrets call failed", principal=caller.principal)
            return text_error(500, "internal error")

    async def index(request: Request) -> Response:
        if (refusal := refused(request, browsers_too=True)) is not None:
            return refusal
        try:
            caller = await identifier.identify(request)
        except IdentityError:
            return text_error(500, "unable to identify caller")
        secrets = await anyio.to_thread.run_sync(service.list, caller)  # as for /api/list
        page = _INDEX.render(principal=caller.principal, secrets=secrets)
        return HTMLResponse(
            page,
            headers={"Content-Security-Policy": "default-src 'none'", "X-Frame-Options": "DENY"},
        )

    async def prometheus(request: Request) -> Response:
        # Counts only (no secret names); still, only callers legerd can identify may read them.
        if (refusal := refused(request, browsers_too=True)) is not None:
            return refusal
        try:
            await identifier.identify(request)
        except IdentityError:
            return text_error(500, "unable to identify caller")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/api/{call:str}", api_call, methods=methods),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ]
    )
