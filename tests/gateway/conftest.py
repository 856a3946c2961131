"""Gateway fixtures: a scripted upstream, the live control plane with models registered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from legator.gateway.models import GatewayUsage
from tests.gateway.scripted_upstream import ScriptedUpstream
from tests.support import LiveServer, live_server

MODES = ("echo", "slow", "die", "fail500", "tools")


@pytest.fixture(scope="session")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream().start()
    yield server
    server.stop()


def register(api: httpx.Client, model_id: str, url: str, **fields: Any) -> dict[str, Any]:
    response = api.post(
        "/api/v1/gateway/models", json={"id": model_id, "backend_url": url, **fields}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def gw(tmp_path: Path, upstream: ScriptedUpstream) -> Iterator[LiveServer]:
    """The control plane with one model per scripted behaviour (id = behaviour)."""
    with live_server(tmp_path / "data") as server, server.client(server.admin_key) as api:
        for mode in MODES:
            register(api, mode, upstream.url, upstream_model=mode, name=f"Scripted {mode}")
        yield server


@pytest.fixture
def admin(gw: LiveServer) -> Iterator[httpx.Client]:
    with gw.client(gw.admin_key) as client:
        yield client


def new_key(admin: httpx.Client, user: str, role: str = "viewer", **pin: Any) -> str:
    if admin.get(f"/api/v1/users/{user}").status_code == 404:
        created = admin.post(
            "/api/v1/users",
            json={"username": user, "password": "correct horse battery", "role": role},
        )
        assert created.status_code == 201, created.text
    response = admin.post("/api/v1/gateway/keys", json={"user": user, **pin})
    assert response.status_code == 201, response.text
    return response.json()["key"]  # type: ignore[no-any-return]


def usage_statuses(gw: LiveServer, model: str) -> list[int]:
    """The statuses of the usage rows written for ``model``, sorted."""
    gw.call(gw.app.state.gateway.recorder.flush())  # type: ignore[union-attr]

    async def read() -> list[int]:
        async with gw.core.db.session() as session:  # type: ignore[union-attr]
            query = select(GatewayUsage.status).where(GatewayUsage.model_id == model)
            return sorted((await session.scalars(query)).all())

    return gw.call(read())
