"""legerd hardening: pages from a DNS-rebound browser, setec's older action names, audited
failures, the policy file's owner and versions an import cannot hold. Each test failed before
its fix."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from legator.secrets.acl import AclError, Action, Policy
from legator.secrets.server import ConfigProblem, Legerd
from tests.secrets.conftest import (
    FakeTailscale,
    LegerdThread,
    make_config,
    whois_tagged,
    whois_user,
)

ALL = ["get", "info", "put", "activate", "delete", "create-version"]
ADMIN_IP, OLD_IP, ODD_IP = "127.0.0.3", "127.0.0.7", "127.0.0.8"
NOBODY_UID = 65534


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture
def admin(legerd: LegerdThread, tailscale: FakeTailscale) -> Iterator[httpx.Client]:
    tailscale.identities[ADMIN_IP] = whois_user(
        "admin@example.com", [{"action": ALL, "secret": ["*"]}]
    )
    with legerd.tcp(ADMIN_IP) as client:
        yield client


# 1. DNS rebinding


@pytest.mark.parametrize(
    "marker",
    [
        {"Origin": "http://rebound.example:8573"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},
    ],
)
@pytest.mark.parametrize("path", ["/", "/metrics"])
def test_index_and_metrics_refuse_what_only_browsers_send(
    legerd: LegerdThread, admin: httpx.Client, path: str, marker: dict[str, str]
) -> None:
    """A page whose name was rebound to legerd's address reads ``/`` and ``/metrics`` with
    its visitor's tailnet identity: neither needs setec's header (Prometheus cannot send it),
    so what browsers add to every request is refused."""
    admin.post("/api/put", json={"Name": "prod/db", "Value": b64(b"v")})
    with legerd.tcp(ADMIN_IP, headers={}) as plain:
        assert plain.get(path).status_code == 200  # Prometheus, curl: no marker
        response = plain.get(path, headers=marker)
    assert response.status_code == 403
    assert response.text.startswith("access denied: legerd does not answer browsers")
    assert "prod/db" not in response.text


def test_allowed_hosts_refuse_a_rebound_name(
    tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale
) -> None:
    """Browsers too old to send Sec-Fetch-* still send the rebound name as Host."""
    tailscale.identities[ADMIN_IP] = whois_user(
        "admin@example.com", [{"action": ALL, "secret": ["*"]}]
    )
    config = make_config(
        tmp_path / "state", shared_dir, tailscale, allowed_hosts=("Legerd.Example.ts.net.",)
    )
    with LegerdThread(config) as running:
        port = config.listen.rpartition(":")[2]
        with running.tcp(ADMIN_IP) as client:
            for host in ("rebound.example", f"rebound.example:{port}", "legerd.example.ts.net.x"):
                for method, path in (("GET", "/"), ("GET", "/metrics"), ("POST", "/api/list")):
                    response = client.request(method, path, headers={"Host": host}, json={})
                    assert (response.status_code, response.text) == (
                        403,
                        "access denied: legerd does not answer to this Host name "
                        "(see allowed hosts)\n",
                    ), (host, path)
            for host in (
                f"legerd.example.ts.net:{port}",
                "LEGERD.example.ts.net.",
                f"127.0.0.1:{port}",
                f"[::1]:{port}",
                f"localhost:{port}",
            ):
                assert client.get("/metrics", headers={"Host": host}).status_code == 200, host
                assert client.post("/api/list", headers={"Host": host}, json={}).status_code == 200
        with running.unix() as local:  # no browser reaches a unix socket
            assert local.post("/api/list", headers={"Host": "rebound.example"}, json={}).is_success


def test_allowed_hosts_are_names_without_ports(tmp_path: Path, shared_dir: Path) -> None:
    config = make_config(tmp_path / "s", shared_dir, None, allowed_hosts=("host.example:8573",))
    with pytest.raises(ConfigProblem, match="without scheme or port"):
        Legerd(config)


# 2. setec's older action names


def test_tailnet_grants_with_setec_older_action_names(
    legerd: LegerdThread, admin: httpx.Client, tailscale: FakeTailscale
) -> None:
    """``list`` (now ``info``) and ``set-active`` (now ``activate``) keep their meaning; an
    action nobody knows grants nothing, and is never a 500."""
    tailscale.identities[OLD_IP] = whois_tagged(
        ["tag:old"], [{"action": ["get", "list", "set-active"], "secret": ["app/*"]}]
    )
    tailscale.identities[ODD_IP] = whois_tagged(
        ["tag:odd"], [{"action": ["get", "fly"], "secret": ["app/*"]}]
    )
    admin.post("/api/put", json={"Name": "app/key", "Value": b64(b"one")})
    admin.post("/api/put", json={"Name": "app/key", "Value": b64(b"two")})
    with legerd.tcp(OLD_IP) as old:
        response = old.post("/api/info", json={"Name": "app/key"})
        assert response.status_code == 200, response.text
        assert response.json()["Versions"] == [1, 2]
        assert [s["Name"] for s in old.post("/api/list", json={}).json()] == ["app/key"]
        assert old.post("/api/activate", json={"Name": "app/key", "Version": 2}).json() == {}
        assert old.post("/api/put", json={"Name": "app/key", "Value": b64(b"x")}).status_code == 403
    with legerd.tcp(ODD_IP) as odd:
        response = odd.post("/api/get", json={"Name": "app/key"})
        assert response.status_code == 200, response.text
        assert response.json()["Value"] == b64(b"two")
        response = odd.post("/api/info", json={"Name": "app/key"})
        assert (response.status_code, response.text) == (403, "access denied\n")


def test_policy_file_takes_older_names_and_names_an_unknown_one(tmp_path: Path) -> None:
    path = tmp_path / "acl.json"
    path.write_text(
        json.dumps([{"principal": "x", "action": ["list", "set-active"], "secret": ["*"]}])
    )
    (rule,) = Policy.load(path).rules_for(["x"])
    assert rule.actions == {Action.INFO, Action.ACTIVATE}
    path.write_text(
        json.dumps(
            [
                {"principal": "x", "action": ["get"], "secret": ["*"]},
                {"principal": "y", "action": ["get", "fly"], "secret": ["*"]},
            ]
        )
    )
    with pytest.raises(AclError) as refused:
        Policy.load(path)
    assert str(refused.value).startswith(f"{path} rule 1: unknown action(s) fly; known: get,")


# 3. audited failures


def test_authorised_calls_that_fail_are_audited_with_their_outcome(
    legerd: LegerdThread, admin: httpx.Client
) -> None:
    admin.post("/api/put", json={"Name": "s", "Value": b64(b"one")})
    calls = [
        ("get", {"Name": "missing"}, 404),
        ("get", {"Name": "s", "Version": 7}, 404),
        ("info", {"Name": "missing"}, 404),
        ("activate", {"Name": "s", "Version": 9}, 404),
        ("activate", {"Name": "missing", "Version": 1}, 404),
        ("delete-version", {"Name": "s", "Version": 5}, 404),
        ("delete-version", {"Name": "s", "Version": 1}, 400),  # the active one
        ("create-version", {"Name": "s", "Version": 1, "Value": b64(b"x")}, 412),
    ]
    for call, body, status in calls:
        assert admin.post(f"/api/{call}", json=body).status_code == status, (call, body)
    lines = legerd.audit_lines[1:]  # after the put
    assert [
        (e["action"], e["secret"], e["version"], e["authorized"], e["outcome"]) for e in lines
    ] == [
        ("get", "missing", 0, True, "not-found"),
        ("get", "s", 7, True, "not-found"),
        ("info", "missing", 0, True, "not-found"),
        ("activate", "s", 9, True, "not-found"),
        ("activate", "missing", 1, True, "not-found"),
        ("delete-version", "s", 5, True, "not-found"),
        ("delete-version", "s", 1, True, "refused"),
        ("create-version", "s", 1, True, "version-claimed"),
    ]
    assert all(e["principal"] == "admin@example.com" for e in lines)
    assert legerd.audit_lines[0]["outcome"] == "ok"


# 4. the policy file's owner


def test_a_policy_file_another_user_owns_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    """Its owner may chmod it writable and grant themselves anything, whatever its mode."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = tmp_path / "acl.json"
    path.write_text(json.dumps([{"principal": "x", "action": ["get"], "secret": ["*"]}]))
    path.chmod(0o644)
    Policy.load(path)  # root's: fine
    os.chown(path, NOBODY_UID, 0)
    with pytest.raises(AclError) as refused:
        Policy.load(path)
    assert str(refused.value).startswith(f"{path}: owned by uid {NOBODY_UID}")
    with pytest.raises(AclError, match="owned by uid"):
        Legerd(make_config(tmp_path / "state", shared_dir, None, acl_path=path))
