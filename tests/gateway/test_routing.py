"""The inference API is matched before every other route, and routing stays correct."""

from __future__ import annotations

import httpx
from fastapi.routing import APIRoute

from tests.support import LiveServer


def _paths(route: object) -> list[str]:
    router = getattr(route, "original_router", None)
    if router is not None:
        return [r.path for r in router.routes if isinstance(r, APIRoute)]
    return [getattr(route, "path", "")]


def test_inference_routes_come_first(gw: LiveServer, admin: httpx.Client) -> None:
    assert gw.app is not None
    leading = []
    for route in gw.app.router.routes:
        paths = _paths(route)
        if not all(p.startswith("/v1/") for p in paths):
            break
        leading += paths
    assert {"/v1/chat/completions", "/v1/messages", "/v1/models"} <= set(leading)
    # Every other route still answers, each wing in its own error shape.
    assert httpx.get(gw.url + "/v1/models").json()["error"]["type"] == "authentication_error"
    assert httpx.get(gw.url + "/api/v1/probes").json()["error"]["code"] == "unauthorized"
    assert admin.get("/api/v1/gateway/models").status_code == 200
    assert admin.get("/healthz").status_code == 200
