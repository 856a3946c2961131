"""`leger auth login` by Tailscale identity, against a fake tailscaled speaking the real whois
JSON. The tailnet address reaches the server as a trusted proxy's X-Forwarded-For, the way a
reverse proxy on the tailnet would hand it over (LEGATOR_TAILSCALE_LOGIN_VIA_PROXY); without
that setting only the connection's own address counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.secrets.conftest import FakeTailscale, whois_tagged, whois_user
from tests.support import LiveServer, live_server, run_cli

TAILNET_IP = "100.101.102.103"
URL = "/api/v1/deploy/auth/tailscale"


@pytest.fixture
def tailscale(tmp_path: Path) -> Iterator[FakeTailscale]:
    with FakeTailscale(tmp_path / "tailscaled.sock") as fake:
        yield fake


@pytest.fixture
def ts_server(tmp_path: Path, tailscale: FakeTailscale) -> Iterator[LiveServer]:
    server = LiveServer(
        tmp_path / "data", tailscale_socket=tailscale.path, tailscale_login_via_proxy=True
    ).start()
    try:
        with server.client(server.admin_key) as api:
            created = api.post(
                "/api/v1/users",
                json={"username": "alice", "email": "Alice@Example.com", "role": "operator"},
            )
            assert created.status_code == 201, created.text
        yield server
    finally:
        server.stop()


def _login(server: LiveServer, ip: str | None) -> httpx.Response:
    headers = {"X-Forwarded-For": ip} if ip else {}
    with server.client() as anon:
        return anon.post(URL, json={"client_name": "host-1"}, headers=headers)


def test_a_tailnet_user_gets_a_key_of_the_matching_legator_user(
    ts_server: LiveServer, tailscale: FakeTailscale
) -> None:
    tailscale.identities[TAILNET_IP] = whois_user("alice@example.com")
    response = _login(ts_server, TAILNET_IP)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["username"] == "alice" and body["expires_at"]
    with ts_server.client(body["api_key"]) as client:
        assert client.get("/api/v1/me").json()["username"] == "alice"
    assert tailscale.calls and tailscale.calls[-1].startswith(TAILNET_IP)


def test_refusals(ts_server: LiveServer, tailscale: FakeTailscale) -> None:
    assert _login(ts_server, None).status_code == 401  # loopback is not the tailnet
    assert _login(ts_server, "192.168.1.9").status_code == 401
    unknown = _login(ts_server, "100.64.0.9")  # tailscaled has never heard of it
    assert unknown.status_code == 401 and "tailscaled" in unknown.json()["error"]["message"]
    tailscale.identities["100.64.0.10"] = whois_tagged(["tag:server"])
    assert "tagged" in _login(ts_server, "100.64.0.10").json()["error"]["message"]
    tailscale.identities["100.64.0.11"] = whois_user("mallory@example.com")
    stranger = _login(ts_server, "100.64.0.11")
    assert stranger.status_code == 401 and "mallory@example.com" in stranger.text
    with ts_server.client(ts_server.admin_key) as api:
        denied = api.get(
            "/api/v1/audit", params={"action": "deploy.tailscale_login", "outcome": "denied"}
        ).json()["events"]
        assert denied and denied[0]["actor"] == "tailscale:mallory@example.com"


def test_not_configured_is_404(server: LiveServer) -> None:
    with server.client() as anon:
        response = anon.post(URL, json={}, headers={"X-Forwarded-For": TAILNET_IP})
    assert response.status_code == 404 and "LEGATOR_TAILSCALE_SOCKET" in response.text


def test_leger_falls_back_to_the_api_key_off_the_tailnet(
    ts_server: LiveServer, tmp_path: Path
) -> None:
    with ts_server.client(ts_server.admin_key) as api:
        key = api.post("/api/v1/keys", json={"user": "alice", "name": "leger"}).json()["key"]
    env = {"LEGER_CONFIG_DIR": str(tmp_path / "leger"), "LEGER_API_KEY": key}
    result = run_cli("leger", "auth", "login", "--server", ts_server.url, env=env)
    assert result.returncode == 0, result.stderr
    assert "as alice via api_key" in result.stdout


def test_a_forwarded_address_counts_only_when_told_to(
    tmp_path: Path, tailscale: FakeTailscale
) -> None:
    """By default a local user cannot claim a tailnet node's identity (and its user's key)
    with an X-Forwarded-For from loopback, a trusted proxy's address."""
    tailscale.identities[TAILNET_IP] = whois_user("alice@example.com")
    with live_server(tmp_path / "data", tailscale_socket=tailscale.path) as server:
        with server.client(server.admin_key) as api:
            api.post("/api/v1/users", json={"username": "alice", "email": "alice@example.com"})
        forged = _login(server, TAILNET_IP)
    assert forged.status_code == 401 and "api_key" not in forged.text
    assert not any(call.startswith(TAILNET_IP) for call in tailscale.calls)


def test_a_login_names_one_user_or_none(ts_server: LiveServer, tailscale: FakeTailscale) -> None:
    """A username is unique and wins; an e-mail address two users share names neither of them
    (which one got the key depended on their order before), and a disabled user's name never
    falls through to another user's e-mail."""
    tailscale.identities[TAILNET_IP] = whois_user("alice@example.com")
    with ts_server.client(ts_server.admin_key) as api:
        other = {"username": "alias", "email": "alice@example.com", "role": "admin"}
        assert api.post("/api/v1/users", json=other).status_code == 201
        shared = _login(ts_server, TAILNET_IP)
        assert shared.status_code == 401 and "several" in shared.json()["error"]["message"]
        assert "api_key" not in shared.text

        named = {"username": "alice@example.com", "email": "x@example.com", "role": "viewer"}
        assert api.post("/api/v1/users", json=named).status_code == 201
        response = _login(ts_server, TAILNET_IP)
        assert response.status_code == 200 and response.json()["username"] == "alice@example.com"

        disabled = api.patch("/api/v1/users/alice@example.com", json={"disabled": True})
        assert disabled.status_code == 200, disabled.text
        refused = _login(ts_server, TAILNET_IP)
        assert refused.status_code == 401 and "no enabled" in refused.json()["error"]["message"]
