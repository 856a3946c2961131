"""The inference API is matched before every other route (its calls served directly), and
routing stays correct."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute

from legator.core.auth.principal import Principal
from legator.core.http.direct import serve_directly
from legator.gateway.openai_api import INFER
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


def test_inference_calls_are_served_directly_with_the_app_s_guarantees(
    gw: LiveServer, admin: httpx.Client
) -> None:
    assert gw.app is not None
    assert set(gw.app.state.direct_routes) == {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/messages"),
    }
    # Without a key: the route's permission is still checked, in the wire format of the path.
    refused = httpx.post(gw.url + "/v1/chat/completions", json={"model": "echo"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    anthropic = httpx.post(gw.url + "/v1/messages", json={}, headers={"x-api-key": "lgk_bad"})
    assert anthropic.status_code == 401
    assert anthropic.json()["type"] == "error"
    # Request id, security headers and the body limit come from the request-context middleware.
    reply = admin.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "direct-route-1"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == "direct-route-1"
    assert reply.headers["x-content-type-options"] == "nosniff"
    too_big = admin.post("/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}", headers={})
    assert too_big.status_code == 413
    assert too_big.json()["error"]["type"] == "invalid_request_error"
    # Other methods on the same path are FastAPI's as before; metrics name the route.
    wrong = admin.get("/v1/chat/completions")
    assert wrong.status_code == 405
    metrics = admin.get("/metrics").text
    assert 'method="POST",route="/v1/chat/completions",status="200"' in metrics


def test_only_request_and_principal_endpoints_can_be_served_directly() -> None:
    app = FastAPI()
    app.state.direct_routes = {}
    router = APIRouter()

    @router.post("/x")
    async def takes_a_query(request: Request, q: int, principal: Principal = INFER) -> Response:
        return Response()

    with pytest.raises(TypeError, match="direct route"):
        serve_directly(app, router.routes[0])  # type: ignore[arg-type]
