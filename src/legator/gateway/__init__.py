"""The Gateway wing: OpenAI- and Anthropic-compatible inference with a fair scheduler."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from legator.core.http.direct import serve_directly
from legator.core.runtime import Core
from legator.gateway.anthropic_api import router as anthropic_router
from legator.gateway.errors import anthropic_formatter, openai_formatter
from legator.gateway.forward import forward
from legator.gateway.openai_api import router as openai_router
from legator.gateway.router import router as admin_router
from legator.gateway.service import ForwardToReplica, Gateway


def install_gateway(app: FastAPI, core: Core) -> Gateway:
    gateway = Gateway(core)
    app.state.gateway = gateway
    # Most specific prefix first: /v1/messages speaks Anthropic, the rest of /v1 OpenAI.
    app.state.error_formatters.append(("/v1/messages", anthropic_formatter))
    app.state.error_formatters.append(("/v1/", openai_formatter))
    app.add_exception_handler(ForwardToReplica, forward)
    app.include_router(anthropic_router)
    app.include_router(openai_router)
    app.include_router(admin_router)
    # The inference calls are the hot path: served without FastAPI's per-request machinery.
    for route in (*openai_router.routes, *anthropic_router.routes):
        if isinstance(route, APIRoute) and route.methods == {"POST"}:
            serve_directly(app, route)
    core.startup_hooks.append(gateway.start)
    core.shutdown_hooks.append(gateway.stop)
    return gateway
