"""Managed-backend fixtures: the control plane with a tiny GGUF registered for a runtime."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.tiny_gguf import tiny_gguf
from tests.support import LiveServer, live_server


@pytest.fixture
def gguf_file() -> Path:
    return tiny_gguf()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data", gateway_start_timeout_s=90) as server:
        yield server


@pytest.fixture
def admin(gw: LiveServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {gw.admin_key}"}
    with httpx.Client(base_url=gw.url, headers=headers, timeout=120) as client:
        yield client


def register_managed(
    admin: httpx.Client, model_id: str, path: Path, kind: str = "process", **fields: Any
) -> dict[str, Any]:
    body = {
        "id": model_id,
        "backend_kind": kind,
        "model_path": str(path),
        "context_length": 256,
        "runtime_args": {"chat_format": "chatml"},
        **fields,
    }
    response = admin.post("/api/v1/gateway/models", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def backend(admin: httpx.Client, model_id: str) -> dict[str, Any]:
    rows = admin.get("/api/v1/gateway/backends").json()
    return next(r for r in rows if r["model"] == model_id)


def wait_state(admin: httpx.Client, model_id: str, state: str, timeout: float) -> float:
    """Seconds until the backend reaches ``state``; fails after ``timeout``."""
    started = time.monotonic()
    while backend(admin, model_id)["state"] != state:
        assert time.monotonic() - started < timeout, backend(admin, model_id)
        time.sleep(0.1)
    return time.monotonic() - started
