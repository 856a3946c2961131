"""Device-code login: leger asks, a signed-in user approves, leger receives a key of theirs."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx

from tests.deploy.helpers import leger
from tests.support import BIN, LiveServer


def test_device_code_api(server: LiveServer, api: httpx.Client, make_user) -> None:  # type: ignore[no-untyped-def]
    anonymous = httpx.Client(base_url=server.url)
    grant = anonymous.post("/api/v1/deploy/device/code", json={"client_name": "host-1"}).json()
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}", grant["user_code"])
    poll = {"device_code": grant["device_code"]}
    assert anonymous.post("/api/v1/deploy/device/token", json=poll).json() == {"status": "pending"}
    viewer = make_user("viewer")
    denied = viewer.post("/api/v1/deploy/device/approve", json={"user_code": grant["user_code"]})
    assert denied.status_code == 403
    operator = make_user("operator")
    # A key scoped to deploying may not approve: the device would get all the operator's
    # permissions (secrets, commands) with it.
    narrow = operator.post("/api/v1/keys", json={"name": "ci", "scopes": ["deploy:write"]})
    with server.client(narrow.json()["key"]) as ci:
        refused = ci.post("/api/v1/deploy/device/approve", json={"user_code": grant["user_code"]})
    assert refused.status_code == 403 and "scope '*'" in refused.json()["error"]["message"]
    approved = operator.post(
        "/api/v1/deploy/device/approve", json={"user_code": grant["user_code"].lower()}
    )
    assert approved.json() == {"approved": True, "client_name": "host-1"}
    again = operator.post("/api/v1/deploy/device/approve", json={"user_code": grant["user_code"]})
    assert again.status_code == 404
    token = anonymous.post("/api/v1/deploy/device/token", json=poll).json()
    assert token["status"] == "approved" and token["api_key"].startswith("lgk_")
    me = httpx.get(
        server.url + "/api/v1/me", headers={"Authorization": f"Bearer {token['api_key']}"}
    )
    assert me.json()["username"] == "operator-user"
    assert anonymous.post("/api/v1/deploy/device/token", json=poll).status_code == 404  # once
    wrong = anonymous.post("/api/v1/deploy/device/token", json={"device_code": "x" * 43})
    assert wrong.status_code == 404
    anonymous.close()


def test_leger_login_with_device_code(
    server: LiveServer,
    make_user,
    leger_env: dict[str, str],  # type: ignore[no-untyped-def]
) -> None:
    operator = make_user("operator")
    proc = subprocess.Popen(
        [str(BIN / "leger"), "auth", "login", "--server", server.url],
        env={**leger_env, "NO_COLOR": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    code = None
    deadline = time.monotonic() + 30
    while code is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"code ([A-Z0-9]{4}-[A-Z0-9]{4})", line):
            code = match.group(1)
    assert code, "leger never showed a user code"
    assert (
        operator.post("/api/v1/deploy/device/approve", json={"user_code": code}).status_code == 200
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "via device_code" in out
    status = json.loads(leger(leger_env, "auth", "status", "--json").stdout)
    assert status["username"] == "operator-user" and status["method"] == "device_code"
    assert status["expires_at"] and not status["expired"]
    auth_file = Path(leger_env["XDG_CONFIG_HOME"]) / "leger/auth.json"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"


def test_one_address_cannot_take_every_pending_code(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        codes = [
            anonymous.post("/api/v1/deploy/device/code", json={"client_name": f"h{n}"})
            for n in range(11)
        ]
        assert [c.status_code for c in codes] == [200] * 10 + [429]
        assert codes[-1].headers["retry-after"] == "600"
        assert "this address" in codes[-1].json()["error"]["message"]
        # Another address (through the trusted local proxy) still starts one.
        other = anonymous.post(
            "/api/v1/deploy/device/code",
            json={"client_name": "elsewhere"},
            headers={"X-Forwarded-For": "192.0.2.9"},
        )
        assert other.status_code == 200


def test_spent_codes_are_deleted(server: LiveServer, make_user) -> None:  # type: ignore[no-untyped-def]
    operator = make_user("operator")
    with httpx.Client(base_url=server.url) as anonymous:
        grant = anonymous.post("/api/v1/deploy/device/code", json={"client_name": "a"}).json()
        operator.post("/api/v1/deploy/device/approve", json={"user_code": grant["user_code"]})
        poll = {"device_code": grant["device_code"]}
        assert anonymous.post("/api/v1/deploy/device/token", json=poll).json()["api_key"]
        anonymous.post("/api/v1/deploy/device/code", json={"client_name": "b"})
        assert anonymous.post("/api/v1/deploy/device/token", json=poll).status_code == 404
    assert server.data_dir is not None
    with sqlite3.connect(server.data_dir / "legator.db") as db:
        assert db.execute("SELECT client_name FROM deploy_device_codes").fetchall() == [("b",)]
