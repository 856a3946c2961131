"""Hot routes served directly: a request for one of them skips FastAPI's router, dependency
solver and exception middleware, and goes straight from the request-context middleware to the
route's own endpoint.

Only for endpoints shaped ``async def endpoint(request, principal=require(P)) -> Response``:
the route stays declared in FastAPI as usual (OpenAPI, the permission walk, 405 for other
methods), its ``Require`` still decides who may call it, and errors are answered by the app's
own exception handlers. What it saves is FastAPI's per-request machinery, about a third of the
gateway's CPU per streamed request (docs/performance.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from legator.core.auth.principal import Principal
from legator.core.http.deps import Require

Endpoint = Callable[[Request, Principal], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class DirectEndpoint:
    route: APIRoute  # scope["route"]: the metrics label and what handlers expect to find
    require: Require
    endpoint: Endpoint


class DirectRoutes:
    """ASGI middleware, innermost of the app's own: ``(method, path)`` → its endpoint."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], DirectEndpoint]) -> None:
        self.app = app
        self.routes = routes  # shared with app.state.direct_routes; filled as wings install

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            direct = self.routes.get((scope["method"], scope["path"]))
            if direct is not None:
                scope["route"] = direct.route
                await self._serve(direct, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, direct: DirectEndpoint, scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive, send)
        try:
            principal = await direct.require(request)
            response = await direct.endpoint(request, principal)
        except Exception as exc:
            response = await _handle(request, exc)
        await response(scope, receive, send)


async def _handle(request: Request, exc: Exception) -> Response:
    """The handler the app registered for the closest class of ``exc`` (as Starlette picks)."""
    handlers: dict[Any, ExceptionHandler] = request.app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            return await handler(request, exc)
    raise exc


def serve_directly(app: FastAPI, route: APIRoute) -> None:
    """Register ``route`` (already in the app) to be served without FastAPI's machinery."""
    requires = [d.call for d in route.dependant.dependencies if isinstance(d.call, Require)]
    params = list(inspect.signature(route.endpoint).parameters)
    if len(requires) != 1 or len(route.dependant.dependencies) != 1 or len(params) != 2:
        raise TypeError(
            f"{route.path}: a direct route takes (request, principal=require(...)) and nothing else"
        )
    for method in route.methods:
        app.state.direct_routes[(method, route.path)] = DirectEndpoint(
            route, requires[0], route.endpoint
        )
