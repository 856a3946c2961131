"""Deleting a model that keys are pinned to: refused with the keys listed, unless forced,
which revokes them; a running managed backend is stopped and its files removed."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil

from tests.gateway.backends.conftest import register_managed
from tests.gateway.conftest import new_key
from tests.support import LiveServer


def test_delete_refused_then_forced(gw: LiveServer, admin: httpx.Client, gguf_file: Path) -> None:
    register_managed(admin, "tiny", gguf_file)
    register_managed(admin, "other", gguf_file)
    raw = new_key(admin, "alice", model="tiny")
    new_key(admin, "bob", model="other")
    refused = admin.delete("/api/v1/gateway/models/tiny")
    assert refused.status_code == 409
    body = refused.json()["error"]
    assert len(body["details"]["keys"]) == 1 and body["details"]["keys"][0]["prefix"] in raw
    assert admin.get("/api/v1/gateway/models/tiny").status_code == 200

    status = admin.post("/api/v1/gateway/backends/tiny/start", params={"wait": "true"}).json()
    assert status["state"] == "ready"
    forced = admin.delete("/api/v1/gateway/models/tiny", params={"force": "true"})
    assert forced.status_code == 204
    assert admin.get("/api/v1/gateway/models/tiny").status_code == 404
    keys = admin.get("/api/v1/gateway/keys", params={"all": "true"}).json()
    by_model = {k["model"]: k for k in keys}
    assert by_model["tiny"]["revoked_at"] is not None
    assert by_model["other"]["revoked_at"] is None
    assert (
        not psutil.pid_exists(status["pid"]) or psutil.Process(status["pid"]).status() == "zombie"
    )
    assert not (gw.data_dir / "gateway" / "backends" / "tiny").exists()  # type: ignore[operator]
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {raw}"}) as user:
        assert user.get("/v1/models").status_code == 401
