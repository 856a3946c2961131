"""Users, API keys, sessions: the acceptance checks of the foundation."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import httpx
import pytest

from legator.core.auth import service as auth_service
from legator.core.db import utcnow
from tests.support import LiveServer


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_me_with_admin_key(api: httpx.Client) -> None:
    me = api.get("/api/v1/me").json()
    assert me["username"] == "admin"
    assert me["role"] == "admin"
    assert me["method"] == "api_key"
    assert "users:write" in me["permissions"]


def test_missing_and_garbage_credentials_are_401(server: LiveServer) -> None:
    with server.client() as anon:
        body = _error(anon.get("/api/v1/me"), 401, "unauthorized")
        assert "authentication required" in body["message"]
        _error(
            anon.get("/api/v1/me", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
        )
        bogus = "lgk_" + "0" * 64
        _error(anon.get("/api/v1/me", headers={"x-api-key": bogus}), 401, "unauthorized")


def test_revoked_key_is_rejected_at_once(api: httpx.Client, server: LiveServer) -> None:
    created = api.post("/api/v1/keys", json={"name": "short-lived"})
    assert created.status_code == 201
    key = created.json()
    assert key["key"].startswith("lgk_") and len(key["key"]) == 68
    with server.client(key["key"]) as client:
        assert client.get("/api/v1/me").status_code == 200
        revoked = api.delete(f"/api/v1/keys/{key['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        body = _error(client.get("/api/v1/me"), 401, "unauthorized")
        assert "revoked" in body["message"]


def test_a_key_in_busy_use_is_refused_once_its_revocation_returns(
    api: httpx.Client, server: LiveServer
) -> None:
    """Lookups under way while the revocation commits must not put the key back in the
    cache: before, a busy key kept working for the cache's 5 s after DELETE returned."""
    key = api.post("/api/v1/keys", json={"name": "busy"}).json()
    revoked_at: list[float] = []
    late: list[float] = []  # requests sent after the revocation returned that got through

    def hammer() -> None:
        with server.client(key["key"]) as client:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                sent = time.monotonic()
                status = client.get("/api/v1/me").status_code
                if status == 200 and revoked_at and sent > revoked_at[0]:
                    late.append(sent - revoked_at[0])

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer) for _ in range(4)]
        time.sleep(0.3)
        assert api.delete(f"/api/v1/keys/{key['id']}").status_code == 200
        revoked_at.append(time.monotonic())
        for worker in workers:
            worker.result()
    assert late == []


def test_expired_key_is_rejected(api: httpx.Client, server: LiveServer) -> None:
    assert server.core is not None
    expires = utcnow() + timedelta(seconds=1.5)
    key, raw = server.call(server.core.auth.create_key("admin", name="brief", expires_at=expires))
    assert key.expires_at == expires
    with server.client(raw) as client:
        assert client.get("/api/v1/me").status_code == 200  # now verified and cached
        time.sleep(max(0.0, (expires - utcnow()).total_seconds()) + 0.1)
        body = _error(client.get("/api/v1/me"), 401, "unauthorized")
        assert "expired" in body["message"]


def test_expiry_in_days_through_the_api(api: httpx.Client) -> None:
    key = api.post("/api/v1/keys", json={"name": "exp", "expires_in_days": 1}).json()
    remaining = datetime.fromisoformat(key["expires_at"]) - utcnow()
    assert timedelta(hours=23, minutes=59) < remaining <= timedelta(days=1)
    _error(api.post("/api/v1/keys", json={"expires_in_days": 0}), 422, "validation_error")


def test_key_is_shown_once_and_never_listed(api: httpx.Client) -> None:
    created = api.post("/api/v1/keys", json={"name": "once"}).json()
    listing = api.get("/api/v1/keys").text
    assert created["key"] not in listing
    assert created["prefix"] in listing
    assert created["key"] not in api.get("/api/v1/audit").text


def test_viewer_cannot_create_users(make_user) -> None:  # type: ignore[no-untyped-def]
    viewer = make_user("viewer")
    response = viewer.post(
        "/api/v1/users", json={"username": "mallory", "password": "x" * 20, "role": "admin"}
    )
    body = _error(response, 403, "forbidden")
    assert "users:write" in body["message"]


def test_a_narrow_key_cannot_manage_its_owners_keys(api: httpx.Client, server: LiveServer) -> None:
    main = api.post("/api/v1/keys", json={"name": "main"}).json()
    weak = api.post("/api/v1/keys", json={"name": "infer", "scopes": ["inference"]}).json()
    with server.client(weak["key"]) as client:
        permissions = client.get("/api/v1/me").json()["permissions"]
        assert "users:read" not in permissions and "account" not in permissions
        # Not even a key as narrow as itself: it would drop its expiry or its model pin.
        for attempt in (
            client.post("/api/v1/keys", json={"name": "same", "scopes": ["inference"]}),
            client.get("/api/v1/keys"),
            client.delete(f"/api/v1/keys/{main['id']}"),
        ):
            assert "'account' permission" in _error(attempt, 403, "forbidden")["message"]
        _error(client.delete("/api/v1/me/identities"), 403, "forbidden")
    assert (
        next(k for k in api.get("/api/v1/keys").json() if k["id"] == main["id"])["revoked_at"]
        is None
    )
    # A key that may manage keys still cannot mint one stronger than itself.
    manager = api.post("/api/v1/keys", json={"name": "m", "scopes": ["account", "fleet:read"]})
    with server.client(manager.json()["key"]) as client:
        body = _error(client.post("/api/v1/keys", json={"name": "escalate"}), 403, "forbidden")
        assert "lacks" in body["message"]
        same = client.post("/api/v1/keys", json={"name": "same", "scopes": ["fleet:read"]})
        assert same.status_code == 201
        assert client.delete(f"/api/v1/keys/{same.json()['id']}").status_code == 200


def test_a_user_holds_a_bounded_number_of_live_keys(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_service, "MAX_LIVE_KEYS", 3)  # the bootstrap key is one
    made = [api.post("/api/v1/keys", json={"name": f"k{n}"}) for n in range(3)]
    assert [r.status_code for r in made] == [201, 201, 409]
    assert "3 live API keys" in _error(made[-1], 409, "conflict")["message"]
    assert api.delete(f"/api/v1/keys/{made[0].json()['id']}").status_code == 200
    assert api.post("/api/v1/keys", json={"name": "again"}).status_code == 201


def test_unknown_scope_is_a_validation_error(api: httpx.Client) -> None:
    body = _error(api.post("/api/v1/keys", json={"scopes": ["root"]}), 422, "validation_error")
    assert "unknown scope" in body["message"]


def test_wrong_password_is_audited_without_the_password(
    api: httpx.Client, server: LiveServer
) -> None:
    secret_attempt = "Sup3r-Secret-Guess-42"
    with server.client() as anon:
        response = anon.post(
            "/api/v1/auth/login", json={"username": "admin", "password": secret_attempt}
        )
        _error(response, 401, "unauthorized")
    events = api.get("/api/v1/audit", params={"action": "auth.login", "outcome": "failure"}).json()
    assert len(events["events"]) == 1
    assert events["events"][0]["target"] == "user:admin"
    assert secret_attempt not in api.get("/api/v1/audit/export").text


def test_a_huge_user_agent_does_not_grow_the_audit_log(
    api: httpx.Client, server: LiveServer
) -> None:
    with server.client() as anon:
        body = {"username": "admin", "password": "wrong-one"}
        anon.post("/api/v1/auth/login", json=body, headers={"User-Agent": "x" * 50_000})
    events = api.get("/api/v1/audit", params={"action": "auth.login"}).json()["events"]
    assert len(events[0]["details"]["user_agent"]) == 300


def test_password_guessing_is_throttled_even_when_the_guesses_arrive_together(
    server: LiveServer, make_user
) -> None:
    make_user("viewer", "bob")

    def guess(_: int) -> httpx.Response:
        with server.client() as anon:
            body = {"username": "admin", "password": "not-the-password"}
            return anon.post("/api/v1/auth/login", json=body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(guess, range(16)))
    statuses = [response.status_code for response in responses]
    assert statuses.count(401) == 10 and statuses.count(429) == 6, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert "too many sign-in attempts" in _error(refused, 429, "rate_limited")["message"]
    assert refused.headers["retry-after"] == "300"
    assert server.credentials is not None
    with server.client() as browser:
        # Even the right password now waits for the window, and the form says why.
        right = {"username": "admin", "password": server.credentials.password}
        page = browser.post("/login", data=right)
        assert page.status_code == 429 and "Too many sign-in attempts" in page.text
        assert page.headers["retry-after"] == "300"
        # Another account from the same address is not locked out.
        bob = {"username": "bob", "password": "correct horse battery"}
        assert browser.post("/api/v1/auth/login", json=bob).status_code == 200


def test_browser_session_login_cookie_and_csrf_safe_logout(server: LiveServer) -> None:
    assert server.credentials is not None
    with server.client() as browser:
        response = browser.post(
            "/api/v1/auth/login",
            json={"username": "admin", "password": server.credentials.password},
        )
        assert response.status_code == 200, response.text
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=86400" in cookie
        assert "Secure" not in cookie  # plain http on loopback
        assert browser.get("/api/v1/me").json()["method"] == "session"
        # A cross-site POST carrying the cookie is refused.
        forged = browser.post("/api/v1/auth/logout", headers={"Origin": "https://evil.example"})
        _error(forged, 403, "forbidden")
        assert browser.get("/api/v1/me").status_code == 200
        same_site = browser.post("/api/v1/auth/logout", headers={"Origin": server.url})
        assert same_site.status_code == 204
        browser.cookies.clear()
        browser.cookies.set("legator_session", cookie.split(";")[0].split("=", 1)[1])
        _error(browser.get("/api/v1/me"), 401, "unauthorized")


def test_session_cookie_is_secure_behind_https_proxy(server: LiveServer) -> None:
    assert server.credentials is not None
    with server.client() as browser:
        response = browser.post(
            "/api/v1/auth/login",
            json={"username": "admin", "password": server.credentials.password},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert "Secure" in response.headers["set-cookie"]


def test_login_form_page(server: LiveServer) -> None:
    assert server.credentials is not None
    with server.client(follow_redirects=False) as browser:
        assert browser.get("/").headers["location"] == "/login"
        page = browser.get("/login")
        assert page.status_code == 200 and "<form" in page.text
        bad = browser.post("/login", data={"username": "admin", "password": "nope"})
        assert bad.status_code == 401 and "Wrong username or password" in bad.text
        good = browser.post(
            "/login",
            data={"username": "admin", "password": server.credentials.password, "next": "//evil"},
        )
        assert good.status_code == 303 and good.headers["location"] == "/"
        assert "admin" in browser.get("/").text


def test_user_crud_and_last_admin_protection(api: httpx.Client) -> None:
    created = api.post(
        "/api/v1/users",
        json={"username": "carol", "password": "a long enough pass", "role": "operator"},
    )
    assert created.status_code == 201
    _error(
        api.post("/api/v1/users", json={"username": "carol", "password": "a long enough pass"}),
        409,
        "conflict",
    )
    assert api.patch("/api/v1/users/carol", json={"role": "auditor"}).json()["role"] == "auditor"
    assert [u["username"] for u in api.get("/api/v1/users").json()] == ["admin", "carol"]
    _error(api.patch("/api/v1/users/admin", json={"role": "viewer"}), 409, "conflict")
    _error(api.delete("/api/v1/users/admin"), 409, "conflict")
    assert api.delete("/api/v1/users/carol").status_code == 204
    _error(api.get("/api/v1/users/carol"), 404, "not_found")


def test_disabled_user_keys_stop_working(api: httpx.Client, make_user) -> None:  # type: ignore[no-untyped-def]
    operator = make_user("operator", "dave")
    assert operator.get("/api/v1/me").status_code == 200
    assert api.patch("/api/v1/users/dave", json={"disabled": True}).status_code == 200
    _error(operator.get("/api/v1/me"), 401, "unauthorized")


def test_other_users_keys_are_invisible_without_keys_admin(api: httpx.Client, make_user) -> None:  # type: ignore[no-untyped-def]
    operator = make_user("operator", "erin")
    admin_key_id = api.get("/api/v1/me").json()["key_id"]
    _error(operator.delete(f"/api/v1/keys/{admin_key_id}"), 404, "not_found")
    _error(operator.get("/api/v1/keys", params={"all": "true"}), 403, "forbidden")
    assert len(api.get("/api/v1/keys", params={"all": "true"}).json()) >= 2
