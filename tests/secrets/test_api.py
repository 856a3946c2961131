"""The setec wire format, versioning and access control, against a real legerd with a fake
tailscaled LocalAPI."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.secrets.conftest import (
    FakeTailscale,
    LegerdThread,
    whois_tagged,
    whois_user,
)

ALL = ["get", "info", "put", "activate", "delete", "create-version"]
ADMIN_IP, ALICE_IP, TAGGED_IP, NOBODY_IP = "127.0.0.3", "127.0.0.2", "127.0.0.4", "127.0.0.9"


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture
def admin(legerd: LegerdThread, tailscale: FakeTailscale) -> httpx.Client:
    tailscale.identities[ADMIN_IP] = whois_user(
        "admin@example.com", [{"action": ALL, "secret": ["*"]}]
    )
    tailscale.identities[ALICE_IP] = whois_user(
        "alice@example.com", [{"action": ["get", "info"], "secret": ["prod/*"]}]
    )
    tailscale.identities[TAGGED_IP] = whois_tagged(
        ["tag:web"], [{"action": ["get"], "secret": ["web/db-password"]}]
    )
    with legerd.tcp(ADMIN_IP) as client:
        yield client


def test_request_checks_match_setec(legerd: LegerdThread, admin: httpx.Client) -> None:
    response = admin.get("/api/list")
    assert (response.status_code, response.text) == (400, "only POST requests allowed\n")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    response = admin.post("/api/list", content=b"{}", headers={"Content-Type": "text/plain"})
    assert (response.status_code, response.text) == (400, "request body must be json\n")
    with legerd.tcp(ADMIN_IP, headers={"Content-Type": "application/json"}) as browserish:
        response = browserish.post("/api/list", content=b"{}")
    assert (response.status_code, response.text) == (403, "access denied\n")
    response = admin.post("/api/get", content=b"{not json")
    assert (response.status_code, response.text) == (400, "bad request\n")
    response = admin.post("/api/get", content=b"[1]")
    assert response.status_code == 400
    assert admin.post("/api/nope", content=b"{}").status_code == 404


def test_versioning_follows_setec(admin: httpx.Client) -> None:
    put = admin.post("/api/put", json={"Name": "prod/db", "Value": b64(b"one")})
    assert (put.status_code, put.text) == (200, "1")
    assert put.headers["content-type"] == "application/json"
    # Same value as the latest: same version, nothing stored.
    assert admin.post("/api/put", json={"Name": "prod/db", "Value": b64(b"one")}).json() == 1
    assert admin.post("/api/put", json={"Name": "prod/db", "Value": b64(b"two")}).json() == 2
    info = admin.post("/api/info", json={"Name": "prod/db"}).json()
    assert info == {"Name": "prod/db", "Versions": [1, 2], "ActiveVersion": 1}
    assert admin.post("/api/get", json={"Name": "prod/db"}).json() == {
        "Value": b64(b"one"),
        "Version": 1,
    }
    assert admin.post("/api/get", json={"Name": "prod/db", "Version": 2}).json()["Value"] == b64(
        b"two"
    )
    # UpdateIfChanged with the active version: 304 and no body.
    same = admin.post("/api/get", json={"Name": "prod/db", "Version": 1, "UpdateIfChanged": True})
    assert (same.status_code, same.content) == (304, b"")
    assert admin.post("/api/activate", json={"Name": "prod/db", "Version": 2}).json() == {}
    assert admin.post("/api/activate", json={"Name": "prod/db", "Version": 2}).status_code == 200
    assert admin.post("/api/set-active", json={"Name": "prod/db", "Version": 2}).json() == {}
    changed = admin.post(
        "/api/get", json={"Name": "prod/db", "Version": 1, "UpdateIfChanged": True}
    )
    assert changed.json() == {"Value": b64(b"two"), "Version": 2}
    # Deleting the active version (or version 0) is refused; an inactive one goes.
    assert (
        admin.post("/api/delete-version", json={"Name": "prod/db", "Version": 2}).status_code == 400
    )
    assert (
        admin.post("/api/delete-version", json={"Name": "prod/db", "Version": 0}).status_code == 400
    )
    assert admin.post("/api/delete-version", json={"Name": "prod/db", "Version": 1}).json() == {}
    gone = admin.post("/api/get", json={"Name": "prod/db", "Version": 1})
    assert (gone.status_code, gone.text) == (404, "not found\n")
    # Versions are never reused, even after deletion.
    assert admin.post("/api/put", json={"Name": "prod/db", "Value": b64(b"one")}).json() == 3
    assert admin.post("/api/activate", json={"Name": "prod/db", "Version": 1}).status_code == 404
    assert admin.post("/api/delete", json={"Name": "prod/db"}).json() == {}
    assert admin.post("/api/info", json={"Name": "prod/db"}).status_code == 404
    # Deleting a secret that does not exist succeeds, as in setec.
    assert admin.post("/api/delete", json={"Name": "prod/db"}).json() == {}


def test_create_version(admin: httpx.Client) -> None:
    call = "/api/create-version"
    zero = admin.post(call, json={"Name": "k", "Version": 0, "Value": b64(b"x")})
    assert zero.status_code == 400
    assert admin.post(call, json={"Name": "k", "Version": 100, "Value": b64(b"a")}).json() == {}
    assert admin.post("/api/get", json={"Name": "k"}).json()["Version"] == 100
    claimed = admin.post(call, json={"Name": "k", "Version": 100, "Value": b64(b"b")})
    assert (claimed.status_code, claimed.text) == (412, "version already set\n")
    # A lower, never-used version may be created, and becomes active.
    assert admin.post(call, json={"Name": "k", "Version": 7, "Value": b64(b"c")}).status_code == 200
    assert admin.post("/api/get", json={"Name": "k"}).json() == {"Value": b64(b"c"), "Version": 7}
    # A put continues after the highest version ever used.
    assert admin.post("/api/put", json={"Name": "k", "Value": b64(b"d")}).json() == 101
    # A deleted version stays claimed.
    assert admin.post("/api/delete-version", json={"Name": "k", "Version": 100}).status_code == 200
    again = admin.post(call, json={"Name": "k", "Version": 100, "Value": b64(b"e")})
    assert again.status_code == 412


@pytest.mark.parametrize(
    "name",
    ["", "x" * 513, "_internal/thing", "tab\there", "caf\u00e9", None, 5],
)
def test_bad_names_are_rejected(admin: httpx.Client, name: object) -> None:
    response = admin.post("/api/put", json={"Name": name, "Value": b64(b"v")})
    assert response.status_code == 400, response.text
    assert response.text.startswith("bad request")


def test_bad_fields_are_rejected(admin: httpx.Client) -> None:
    assert admin.post("/api/put", json={"Name": "a", "Value": "%%%"}).status_code == 400
    assert admin.post("/api/get", json={"Name": "a", "Version": "1"}).status_code == 400
    assert admin.post("/api/get", json={"Name": "a", "Version": -1}).status_code == 400
    assert admin.post("/api/put", json={"Name": "x" * 512, "Value": b64(b"v")}).status_code == 200
    huge = admin.post("/api/get", json={"Name": "a", "Version": 1 << 64})
    assert huge.status_code == 400 and "at most" in huge.text
    too_big = admin.post("/api/put", json={"Name": "big", "Value": b64(b"x" * (1 << 20) + b"x")})
    assert too_big.status_code == 400 and "larger than" in too_big.text
    body = json.dumps({"Name": "big", "Value": b64(b"x" * (2 << 20))}).encode()
    streamed = admin.post(
        "/api/put", content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    )
    assert streamed.status_code == 400 and "2 MiB" in streamed.text
    assert admin.post("/api/put", json={"Name": "max", "Value": b64(b"x" * (1 << 20))}).json() == 1


def test_acl_from_capability_map(legerd: LegerdThread, admin: httpx.Client) -> None:
    for name in ("prod/api", "staging/api", "web/db-password"):
        assert admin.post("/api/put", json={"Name": name, "Value": b64(name.encode())}).json() == 1
    with legerd.tcp(ALICE_IP) as alice:
        assert alice.post("/api/get", json={"Name": "prod/api"}).json()["Value"] == b64(b"prod/api")
        denied = alice.post("/api/get", json={"Name": "staging/api"})
        assert (denied.status_code, denied.text) == (403, "access denied\n")
        # Denied before existence is checked: no probing for names.
        assert alice.post("/api/get", json={"Name": "staging/nothing"}).status_code == 403
        assert (
            alice.post("/api/put", json={"Name": "prod/api", "Value": b64(b"x")}).status_code == 403
        )
        listed = alice.post("/api/list", content=b"{}").json()
        assert [i["Name"] for i in listed] == ["prod/api"]
    with legerd.tcp(TAGGED_IP) as web:
        assert web.post("/api/get", json={"Name": "web/db-password"}).status_code == 200
        # get without info: the list is empty.
        assert web.post("/api/list", content=b"{}").json() == []
    with legerd.tcp(NOBODY_IP) as stranger:
        unknown = stranger.post("/api/list", content=b"{}")
        assert (unknown.status_code, unknown.text) == (500, "unable to identify caller\n")
    assert admin.post("/api/list", content=b"{}").json() == [
        {"Name": "prod/api", "Versions": [1], "ActiveVersion": 1},
        {"Name": "staging/api", "Versions": [1], "ActiveVersion": 1},
        {"Name": "web/db-password", "Versions": [1], "ActiveVersion": 1},
    ]


def test_audit_log_records_every_access_without_values(
    legerd: LegerdThread, admin: httpx.Client
) -> None:
    admin.post("/api/put", json={"Name": "prod/token", "Value": b64(b"s3cr3t-value")})
    admin.post("/api/get", json={"Name": "prod/token"})
    # The same value again stores nothing, but is audited as every put is.
    admin.post("/api/put", json={"Name": "prod/token", "Value": b64(b"s3cr3t-value")})
    with legerd.tcp(ALICE_IP) as alice:
        alice.post("/api/put", json={"Name": "prod/token", "Value": b64(b"other")})
    admin.post("/api/delete", json={"Name": "gone/never-there"})
    text = legerd.config.audit_path.read_text()
    assert "s3cr3t" not in text and b64(b"s3cr3t-value") not in text
    assert legerd.config.audit_path.stat().st_mode & 0o777 == 0o600
    entries = legerd.audit_lines
    assert [(e["principal"], e["action"], e["authorized"], e["version"]) for e in entries] == [
        ("admin@example.com", "put", True, 1),
        ("admin@example.com", "get", True, 1),
        ("admin@example.com", "put", True, 1),
        ("alice@example.com", "put", False, 0),
        ("admin@example.com", "delete", True, 0),
    ]
    assert all(
        {"time", "principal", "action", "secret", "version", "authorized"} <= set(e)
        for e in entries
    )


def test_html_index_shows_names_not_values(legerd: LegerdThread, admin: httpx.Client) -> None:
    admin.post("/api/put", json={"Name": "prod/<b>", "Value": b64(b"hidden-value")})
    admin.post("/api/put", json={"Name": "staging/x", "Value": b64(b"hidden-value")})
    with legerd.tcp(ALICE_IP, headers={}) as browser:
        page = browser.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "prod/&lt;b&gt;" in page.text and "staging/x" not in page.text
    assert "hidden-value" not in page.text and b64(b"hidden-value") not in page.text


def test_policy_file_grants_principals(tmp_path, shared_dir, tailscale: FakeTailscale) -> None:  # type: ignore[no-untyped-def]
    from tests.secrets.conftest import make_config

    policy = tmp_path / "acl.json"
    policy.write_text(
        json.dumps(
            [
                {"principal": "tag:ci", "action": ["get", "info"], "secret": ["ci/*"]},
                {"principal": ["*@example.com"], "action": ["put"], "secret": ["ci/*"]},
            ]
        )
    )
    tailscale.identities["127.0.0.5"] = whois_tagged(["tag:ci"])
    tailscale.identities["127.0.0.6"] = whois_user("bob@example.com")
    config = make_config(tmp_path / "state", shared_dir, tailscale, acl_path=policy)
    with LegerdThread(config) as running:
        with running.tcp("127.0.0.6") as bob:
            assert bob.post("/api/put", json={"Name": "ci/key", "Value": b64(b"k")}).json() == 1
            assert bob.post("/api/get", json={"Name": "ci/key"}).status_code == 403
        with running.tcp("127.0.0.5") as ci:
            assert ci.post("/api/get", json={"Name": "ci/key"}).json()["Value"] == b64(b"k")
            assert (
                ci.post("/api/put", json={"Name": "ci/key", "Value": b64(b"z")}).status_code == 403
            )


def test_bad_policy_file_stops_start(tmp_path, shared_dir) -> None:  # type: ignore[no-untyped-def]
    from legator.secrets.acl import AclError
    from legator.secrets.server import Legerd
    from tests.secrets.conftest import make_config

    policy = tmp_path / "acl.json"
    policy.write_text(json.dumps([{"principal": "x", "action": ["steal"], "secret": ["*"]}]))
    with pytest.raises(AclError, match="unknown action"):
        Legerd(make_config(tmp_path / "state", shared_dir, None, acl_path=policy))


def test_metrics(legerd: LegerdThread, admin: httpx.Client) -> None:
    admin.post("/api/put", json={"Name": "m", "Value": b64(b"v")})
    admin.post("/api/get", json={"Name": "missing"})
    text = admin.get("/metrics").text
    assert 'legerd_api_calls_total{call="put",status="200"} 1.0' in text
    assert 'legerd_api_calls_total{call="get",status="404"} 1.0' in text
    assert "legerd_api_call_seconds_bucket" in text and '"m"' not in text
    with legerd.tcp(NOBODY_IP) as stranger:
        assert stranger.get("/metrics").status_code == 500


def test_tampered_value_is_a_plain_internal_error(
    legerd: LegerdThread, admin: httpx.Client
) -> None:
    import sqlite3

    admin.post("/api/put", json={"Name": "t", "Value": b64(b"v")})
    with sqlite3.connect(legerd.config.db_path, isolation_level=None) as db:
        db.execute("UPDATE versions SET sealed = sealed || x'00'")
    response = admin.post("/api/get", json={"Name": "t"})
    assert (response.status_code, response.text) == (500, "internal error\n")


def test_malformed_capability_grant_is_unidentified(
    legerd: LegerdThread, tailscale: FakeTailscale
) -> None:
    # A grant setec could not decode either (an unknown action is not one: it grants nothing,
    # see test_hardening.py).
    tailscale.identities["127.0.0.7"] = whois_user(
        "eve@example.com", [{"action": "get", "secret": ["*"]}]
    )
    tailscale.identities["127.0.0.8"] = {"Node": {"Tags": None}, "UserProfile": {}, "CapMap": {}}
    for ip in ("127.0.0.7", "127.0.0.8"):
        with legerd.tcp(ip) as caller:
            response = caller.post("/api/list", content=b"{}")
        assert (response.status_code, response.text) == (500, "unable to identify caller\n")
    assert any(call.startswith("127.0.0.7:") for call in tailscale.calls)
