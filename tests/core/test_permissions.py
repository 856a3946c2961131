"""Every route declares a permission, and each role gets exactly what its map says."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute, iter_route_contexts
from starlette.routing import Mount

from legator.app import create_app
from legator.core.auth.permissions import ROLE_PERMISSIONS, Permission, Role
from legator.core.config import Settings
from legator.core.http.deps import Require

ALLOWED_MOUNTS = {"/static"}  # public stylesheet and images, nothing else


def _declared(dependant: Dependant) -> list[Permission]:
    found = [d.call.permission for d in dependant.dependencies if isinstance(d.call, Require)]
    for child in dependant.dependencies:
        found += _declared(child)
    return found


def test_every_route_declares_exactly_one_permission(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    undeclared, ambiguous = [], []
    routes = list(iter_route_contexts(app.routes))
    assert len(routes) > 20
    for context in routes:
        route = context.original_route
        if isinstance(route, Mount):
            assert route.path in ALLOWED_MOUNTS, f"unexpected mount {route.path}"
            continue
        assert isinstance(route, APIRoute | APIWebSocketRoute), f"{route!r} is not an API route"
        declared = set(_declared(route.dependant))
        if not declared:
            undeclared.append(context.path)
        elif len(declared) > 1:
            ambiguous.append((context.path, declared))
    assert not undeclared, f"routes without a permission: {undeclared}"
    assert not ambiguous, f"routes with several permissions: {ambiguous}"


# (method, path, permission it needs, body)
ROUTE_GROUPS = [
    ("GET", "/api/v1/me", Permission.AUTHENTICATED, None),
    ("GET", "/api/v1/keys", Permission.AUTHENTICATED, None),
    ("GET", "/api/v1/users", Permission.USERS_READ, None),
    ("POST", "/api/v1/users", Permission.USERS_WRITE, {"username": "zed", "password": "z" * 16}),
    ("GET", "/api/v1/audit", Permission.AUDIT_READ, None),
    ("GET", "/api/v1/audit/verify", Permission.AUDIT_READ, None),
    ("GET", "/metrics", Permission.METRICS_READ, None),
]


@pytest.mark.parametrize("role", [r.value for r in Role])
def test_role_matrix(role: str, api: httpx.Client, make_user) -> None:  # type: ignore[no-untyped-def]
    client = make_user(role, f"{role}-matrix")
    granted = ROLE_PERMISSIONS[Role(role)]
    for method, path, permission, body in ROUTE_GROUPS:
        response = client.request(method, path, json=body)
        if permission in granted:
            assert response.status_code in (200, 201), (role, path, response.text)
            if method == "POST" and path == "/api/v1/users":
                api.delete("/api/v1/users/zed")
        else:
            assert response.status_code == 403, (role, path, response.status_code)
            assert response.json()["error"]["code"] == "forbidden"
    # The event stream's permission is checked before the stream opens.
    with client.stream("GET", "/api/v1/events") as response:
        expected = 200 if Permission.EVENTS_READ in granted else 403
        assert response.status_code == expected
