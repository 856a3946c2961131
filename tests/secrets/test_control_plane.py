"""The control plane's /api/v1/secrets mount (same service, control-plane auth and audit)
and `leger secrets sync` from it into a real legerd."""

from __future__ import annotations

import base64
import getpass
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from legator.deploy.client import Login, save_login
from legator.secrets.client import Client
from legator.secrets.errors import AccessDenied, VersionClaimed
from tests.fake_proxy import fake_proxy
from tests.secrets.conftest import LegerdThread
from tests.support import LiveServer, run_cli


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_mount_speaks_setec_with_control_plane_auth(
    server: LiveServer, api: httpx.Client, make_user: Callable[..., httpx.Client]
) -> None:
    assert (
        api.post("/api/v1/secrets/put", json={"Name": "llm/openai", "Value": b64(b"sk-1")}).json()
        == 1
    )
    assert (
        api.post("/api/v1/secrets/put", json={"Name": "llm/openai", "Value": b64(b"sk-2")}).json()
        == 2
    )
    got = api.post("/api/v1/secrets/get", json={"Name": "llm/openai"})
    assert got.json() == {"Value": b64(b"sk-1"), "Version": 1}
    unchanged = api.post(
        "/api/v1/secrets/get", json={"Name": "llm/openai", "Version": 1, "UpdateIfChanged": True}
    )
    assert (unchanged.status_code, unchanged.content) == (304, b"")
    assert (
        api.post("/api/v1/secrets/activate", json={"Name": "llm/openai", "Version": 2}).json() == {}
    )
    listed = api.post("/api/v1/secrets/list", json={}).json()
    assert listed == [{"Name": "llm/openai", "Versions": [1, 2], "ActiveVersion": 2}]
    missing = api.post("/api/v1/secrets/get", json={"Name": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = api.post("/api/v1/secrets/put", json={"Name": "_internal/x", "Value": b64(b"v")})
    assert bad.status_code == 400 and "reserved" in bad.json()["error"]["message"]
    created = api.post(
        "/api/v1/secrets/create-version",
        json={"Name": "llm/openai", "Version": 1, "Value": b64(b"x")},
    )
    assert created.status_code == 412

    viewer = make_user("viewer")
    assert viewer.post("/api/v1/secrets/get", json={"Name": "llm/openai"}).status_code == 403
    assert httpx.post(server.url + "/api/v1/secrets/list", json={}).status_code == 401

    # The same Python client works against the mount.
    with Client(server.url, api_key=server.admin_key, prefix="/api/v1/secrets") as client:
        assert client.get("llm/openai") == (b"sk-2", 2)
        assert client.whoami() == "admin"
        try:
            client.create_version("llm/openai", 2, b"y")
        except VersionClaimed:
            pass
        else:
            raise AssertionError("a claimed version was accepted")

    events = api.get("/api/v1/audit", params={"action": "secrets.*"}).json()
    items = events["events"]
    actions = {(e["action"], e["target"], e["actor"]) for e in items}
    assert ("secrets.put", "llm/openai", "admin") in actions
    assert ("secrets.get", "llm/openai", "admin") in actions
    # Authorised calls that fail are audited as failures, legerd's outcome in the details.
    failed = {
        (e["action"], e["target"], e["details"]["outcome"])
        for e in items
        if e["outcome"] == "failure"
    }
    assert failed == {
        ("secrets.get", "nope", "not-found"),
        ("secrets.create-version", "llm/openai", "version-claimed"),
    }
    assert "sk-1" not in json.dumps(items) and b64(b"sk-1") not in json.dumps(items)


def test_viewer_is_denied_and_audited(
    api: httpx.Client, make_user: Callable[..., httpx.Client]
) -> None:
    viewer = make_user("viewer", "vera")
    with_key = viewer.headers["Authorization"].split()[1]
    with Client(str(viewer.base_url), api_key=with_key, prefix="/api/v1/secrets") as client:
        try:
            client.list()
        except AccessDenied:
            pass
        else:
            raise AssertionError("a viewer could list secrets")


def test_sync_copies_deploy_secrets_into_legerd(
    server: LiveServer, api: httpx.Client, dev_legerd: LegerdThread, tmp_path: Path
) -> None:
    for name, value in (
        ("deploy/admin/db-password", b"pw"),
        ("deploy/admin/api-token", b"tok"),
        ("deploy/someone-else/db-password", b"theirs"),
        ("llm/openai", b"not-deploy"),
    ):
        assert (
            api.post("/api/v1/secrets/put", json={"Name": name, "Value": b64(value)}).status_code
            == 200
        )
    env = {"LEGATOR_API_KEY": server.admin_key}
    args = (
        "leger",
        "secrets",
        "--server",
        dev_legerd.url or "",
        "sync",
        "--control-plane",
        server.url,
    )
    first = run_cli(*args, "--json", env=env)
    assert first.returncode == 0, first.stderr
    me = getpass.getuser()
    assert json.loads(first.stdout) == [
        {"Name": f"leger/{me}/api-token", "Version": 1},
        {"Name": f"leger/{me}/db-password", "Version": 1},
    ]
    api.post("/api/v1/secrets/put", json={"Name": "deploy/admin/db-password", "Value": b64(b"pw2")})
    api.post("/api/v1/secrets/activate", json={"Name": "deploy/admin/db-password", "Version": 2})
    assert run_cli(*args, env=env).returncode == 0
    with Client(dev_legerd.url) as local:
        assert local.get(f"leger/{me}/db-password") == (b"pw2", 2)
        assert local.get(f"leger/{me}/api-token") == (b"tok", 1)
        assert all("someone-else" not in i.name and "llm" not in i.name for i in local.list())
    no_key = run_cli(*args, env={"LEGER_CONFIG_DIR": str(tmp_path / "nologin")})
    assert no_key.returncode == 2 and "LEGATOR_API_KEY" in no_key.stderr


def test_sync_uses_the_login_of_leger_auth_login(
    server: LiveServer, api: httpx.Client, dev_legerd: LegerdThread, tmp_path: Path
) -> None:
    put = api.post("/api/v1/secrets/put", json={"Name": "deploy/admin/tls", "Value": b64(b"k")})
    assert put.status_code == 200
    config = tmp_path / "config"
    env = {"LEGER_CONFIG_DIR": str(config), "LEGATOR_API_KEY": "", "LEGATOR_URL": ""}
    sync = ("leger", "secrets", "--server", dev_legerd.url or "", "sync")
    not_logged_in = run_cli(*sync, env=env)
    assert not_logged_in.returncode == 2, not_logged_in.stderr
    assert "leger auth login" in not_logged_in.stderr
    login = Login(
        server=server.url,
        token=server.admin_key,
        method="api_key",
        username="admin",
        key_id=None,
        expires_at=None,
        logged_in_at=datetime.now(UTC).isoformat(),
    )
    save_login(config / "auth.json", login)
    done = run_cli(*sync, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"Name": f"leger/{getpass.getuser()}/tls", "Version": 1}]
    # The stored token goes only to the server that issued it.
    with fake_proxy() as elsewhere:
        other = run_cli(*sync, "--control-plane", elsewhere, env=env)
        assert other.returncode == 2 and f"logged in to {server.url}" in other.stderr
        # A sign-in page in front of the control plane: one line, exit 1.
        login.server = elsewhere
        save_login(config / "auth.json", login)
        proxied = run_cli(*sync, env=env)
    assert proxied.returncode == 1 and "Traceback" not in proxied.stderr
    assert f"{elsewhere} did not answer with JSON" in proxied.stderr


def test_secrets_kek_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from legator.core.config import ConfigError, load_settings
    from legator.secrets.crypto import generate_key
    from tests.support import live_server

    with pytest.raises(ConfigError, match="LEGATOR_SECRETS_KEK: must be 64 hex"):
        load_settings(secrets_kek="abc")
    key = generate_key().hex()
    vault = tmp_path / "vault"
    with live_server(tmp_path / "data", secrets_kek=key, secrets_dir=vault) as srv:
        put = srv.client(srv.admin_key).post(
            "/api/v1/secrets/put", json={"Name": "k", "Value": b64(b"v")}
        )
        assert put.json() == 1
    assert (tmp_path / "vault" / "secrets.db").exists()
    assert not (tmp_path / "vault" / "keys").exists()  # the key came from the setting
    other = generate_key().hex()
    failed = run_cli(
        "legator",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        env={"LEGATOR_SECRETS_KEK": other, "LEGATOR_SECRETS_DIR": str(vault)},
    )
    assert failed.returncode == 2
    assert "secrets store:" in failed.stderr and "not the one" in failed.stderr
    assert "Traceback" not in failed.stderr
    nowhere = run_cli(
        "legator", "serve", env={"LEGATOR_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    )
    assert nowhere.returncode == 2 and "LEGATOR_SECRETS_DIR" in nowhere.stderr


def test_control_plane_own_secrets_are_out_of_reach(
    server: LiveServer, api: httpx.Client, make_user: Callable[..., httpx.Client]
) -> None:
    """legator/ holds the control plane's own secrets (the Model Dock's provider keys): no
    caller of the API, admin included, may list, read, change, delete or plant one."""
    key = "sk-ant-dock-secret-0123456789"
    created = api.post(
        "/api/v1/brain/profiles",
        json={"name": "claude", "provider": "anthropic", "model": "m", "api_key": key},
    )
    assert created.status_code == 201, created.text
    name = f"legator/brain/{created.json()['id']}"
    planted = "legator/brain/a-future-profile"
    evil = b64(b"sk-attacker")
    operator = make_user("operator", "olive")
    assert operator.get("/api/v1/brain/profiles").json()[0]["api_key"] == "sk-…6789"
    for client in (operator, api):
        assert client.post("/api/v1/secrets/list", json={}).json() == []
        for call, body in (
            ("get", {"Name": name}),
            ("get", {"Name": name, "Version": 1, "UpdateIfChanged": True}),
            ("info", {"Name": name}),
            ("put", {"Name": name, "Value": evil}),
            ("create-version", {"Name": name, "Version": 2, "Value": evil}),
            ("activate", {"Name": name, "Version": 1}),
            ("delete-version", {"Name": name, "Version": 1}),
            ("delete", {"Name": name}),
            ("put", {"Name": planted, "Value": evil}),
            ("create-version", {"Name": planted, "Version": 1, "Value": evil}),
        ):
            got = client.post(f"/api/v1/secrets/{call}", json=body)
            assert got.status_code == 403, (call, got.status_code, got.text)
            assert got.json()["error"]["code"] == "forbidden"
            assert "legator/" in got.json()["error"]["message"]
            assert key not in got.text and b64(key.encode()) not in got.text

    # The key is untouched and nothing was planted; the refusals are in the audit log.
    assert server.app is not None
    store = server.app.state.secrets.store
    assert [(i.name, i.versions) for i in store.list()] == [(name, [1])]
    assert store.get(name) == (key.encode(), 1)
    events = api.get("/api/v1/audit", params={"action": "secrets.*", "limit": 1000}).json()
    denied = {(e["action"], e["target"], e["actor"]) for e in events["events"]}
    assert ("secrets.get", name, "olive") in denied
    assert ("secrets.put", planted, "admin") in denied

    # Other names still work as before.
    assert operator.post("/api/v1/secrets/put", json={"Name": "app/x", "Value": evil}).json() == 1
    assert operator.post("/api/v1/secrets/get", json={"Name": "app/x"}).json()["Value"] == evil
