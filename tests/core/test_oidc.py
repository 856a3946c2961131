"""Single sign-on over OIDC, end to end: the real app under uvicorn against a fake provider
that speaks the real protocol (tests/core/fake_oidc.py), stepped through redirect by
redirect with httpx, as a browser would follow them."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import update

from legator.core.auth.models import OidcPending
from legator.core.auth.oidc_provider import (
    CACHE_TTL_S,
    MAX_DOCUMENT_BYTES,
    STALE_GRACE_S,
    IdentityClaims,
    OidcError,
    OidcProvider,
    ProviderUnavailable,
    parse_metadata,
)
from legator.core.config import load_settings
from legator.core.db import utcnow
from legator.core.logging import configure_logging
from tests.core.fake_oidc import CLIENT_ID, CLIENT_SECRET, FakeProvider, Grant, Knobs
from tests.support import LiveServer, free_port, live_server

CALLBACK = "/api/v1/auth/oidc/callback"
LOGIN = "/api/v1/auth/oidc/login"
LINK = "/api/v1/auth/oidc/link"


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider().start()
    try:
        yield fake
    finally:
        fake.stop()


@contextmanager
def sso_live_server(
    data_dir: Path, provider: FakeProvider, **settings: Any
) -> Iterator[LiveServer]:
    """A running server whose single sign-on goes to ``provider``."""
    server = LiveServer(
        data_dir,
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        **settings,
    )
    server.settings_overrides["oidc_redirect_url"] = server.url + CALLBACK
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sso_server(
    provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("oidc") / "data"
    with sso_live_server(data_dir, provider, oidc_default_role="operator") as server:
        yield server


@pytest.fixture
def person(provider: FakeProvider, sso_server: LiveServer) -> dict[str, Any]:
    """A fresh person at the provider for each test, a well-behaved provider, and a fresh
    count of attempts per client (every test comes from 127.0.0.1)."""
    provider.knobs = Knobs()
    assert sso_server.core is not None and sso_server.core.oidc is not None
    sso_server.core.oidc.attempts.clear()
    provider.person = {
        "sub": "sub-" + secrets.token_hex(6),
        "preferred_username": "Alice Example",
        "email": "alice@example.com",
        "email_verified": True,
        "name": "Alice Example",
    }
    return provider.person


@pytest.fixture
def browser(sso_server: LiveServer) -> Iterator[httpx.Client]:
    with sso_server.client() as client:
        yield client


@pytest.fixture
def admin(sso_server: LiveServer) -> Iterator[httpx.Client]:
    with sso_server.client(sso_server.admin_key) as client:
        yield client


def start(browser: httpx.Client, next_path: str | None = None) -> str:
    """Open the login endpoint; return the provider's authorization URL it redirects to."""
    params = {"next": next_path} if next_path is not None else {}
    response = browser.get(LOGIN, params=params)
    assert response.status_code == 303, response.text
    return response.headers["location"]


def at_provider(authorization_url: str) -> str:
    """Visit the provider's authorization endpoint; return the callback URL it sends us to."""
    response = httpx.get(authorization_url)
    assert response.status_code == 302, response.text
    return response.headers["location"]


def sign_in(browser: httpx.Client, next_path: str | None = None) -> httpx.Response:
    return browser.get(at_provider(start(browser, next_path)))


def sso_error(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert location.path == "/login", response.headers["location"]
    return parse_qs(location.query)["sso_error"][0]


def last_login_event(admin: httpx.Client) -> dict[str, Any]:
    events = admin.get("/api/v1/audit", params={"action": "auth.login", "limit": 1}).json()
    return events["events"][0]  # type: ignore[no-any-return]


# ----- the happy path ------------------------------------------------------------------


def test_first_sign_in_creates_the_user_with_the_default_role(
    browser: httpx.Client, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    authorization_url = start(browser, "/fleet?tab=hosts")
    query = parse_qs(urlsplit(authorization_url).query)
    assert authorization_url.startswith(provider.issuer + "/authorize?")
    assert query["code_challenge_method"] == ["S256"]
    assert query["scope"] == ["openid email profile"]
    assert query["redirect_uri"][0].endswith(CALLBACK)
    cookie = browser.cookies.jar
    pending = next(c for c in cookie if c.name == "legator_oidc")
    assert pending.path == "/api/v1/auth/oidc"

    done = browser.get(at_provider(authorization_url))
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/fleet?tab=hosts"
    set_cookie = done.headers.get_list("set-cookie")
    session = next(c for c in set_cookie if c.startswith("legator_session="))
    assert "HttpOnly" in session and "samesite=lax" in session.lower()
    assert any(c.startswith("legator_oidc=") and "Max-Age=0" in c for c in set_cookie)

    me = browser.get("/api/v1/me")
    assert me.status_code == 200, me.text
    assert me.json()["username"] == "alice-example"
    assert me.json()["role"] == "operator"
    assert me.json()["method"] == "session"

    user = admin.get("/api/v1/users/alice-example").json()
    assert user["email"] == "alice@example.com" and user["display_name"] == "Alice Example"

    # The token endpoint got the PKCE verifier and the client's credentials (it checks them).
    exchange = provider.token_requests[-1]
    assert exchange["grant_type"] == "authorization_code" and exchange["code_verifier"]

    event = last_login_event(admin)
    assert event["outcome"] == "success" and event["actor"] == "alice-example"
    assert event["details"]["method"] == "oidc"
    assert event["details"]["issuer"] == provider.issuer
    created = admin.get("/api/v1/audit", params={"action": "user.create", "limit": 1}).json()
    assert created["events"][0]["details"]["via"] == "oidc"

    # The web page is signed in too: the same session cookie.
    assert browser.get("/").status_code == 200
    admin.delete("/api/v1/users/alice-example")


def test_second_sign_in_reuses_the_user_and_names_stay_unique(
    sso_server: LiveServer,
    admin: httpx.Client,
    provider: FakeProvider,
    person: dict[str, Any],
) -> None:
    person["preferred_username"] = "bob"
    with sso_server.client() as first, sso_server.client() as again:
        assert sign_in(first).status_code == 303
        bob = first.get("/api/v1/me").json()
        assert sign_in(again).status_code == 303
        assert again.get("/api/v1/me").json()["user_id"] == bob["user_id"]
    # A different person asking for the same name gets another one, not Bob's account.
    provider.person = {**person, "sub": "someone-else-" + secrets.token_hex(4)}
    with sso_server.client() as other:
        assert sign_in(other).status_code == 303
        me = other.get("/api/v1/me").json()
        assert me["username"] == "bob-2" and me["user_id"] != bob["user_id"]
    # A user of that name created by hand is never taken over either.
    provider.person = {
        "sub": "third-" + secrets.token_hex(4),
        "email": "Carol@Example.com",
        "email_verified": True,
    }
    admin.post("/api/v1/users", json={"username": "carol@example.com", "role": "admin"})
    with sso_server.client() as carol:
        assert sign_in(carol).status_code == 303
        me = carol.get("/api/v1/me").json()
        assert me["username"] == "carol@example.com-2" and me["role"] == "operator"


def test_local_next_only(browser: httpx.Client, person: dict[str, Any]) -> None:
    for evil in ("https://evil.example", "//evil.example", "/\\evil.example", "evil", "/a\nb"):
        response = browser.get(LOGIN, params={"next": evil})
        assert response.status_code == 400, evil
        body = response.json()["error"]
        assert body["code"] == "bad_request" and "path on this server" in body["message"]
    assert sign_in(browser).headers["location"] == "/"


# ----- refusals ------------------------------------------------------------------------


def test_wrong_state_is_refused(
    browser: httpx.Client, admin: httpx.Client, person: dict[str, Any]
) -> None:
    callback = urlsplit(at_provider(start(browser)))
    code = parse_qs(callback.query)["code"][0]
    response = browser.get(CALLBACK, params={"code": code, "state": "not-the-state"})
    assert sso_error(response) == "bad_state"
    assert browser.get("/api/v1/me").status_code == 401
    event = last_login_event(admin)
    assert event["outcome"] == "failure" and event["details"]["reason"] == "bad_state"
    assert code not in json.dumps(event)  # no code (or token) in the audit log


def test_replayed_state_is_refused(browser: httpx.Client, person: dict[str, Any]) -> None:
    authorization_url = start(browser)
    binding = browser.cookies["legator_oidc"]
    callback = at_provider(authorization_url)
    assert browser.get(callback).status_code == 303
    # The same callback again, with the same browser cookie, and even a fresh code.
    browser.cookies.set("legator_oidc", binding, path="/api/v1/auth/oidc")
    assert sso_error(browser.get(callback)) == "bad_state"
    browser.cookies.set("legator_oidc", binding, path="/api/v1/auth/oidc")
    assert sso_error(browser.get(at_provider(authorization_url))) == "bad_state"


def test_callback_in_another_browser_is_refused(
    sso_server: LiveServer, browser: httpx.Client, person: dict[str, Any]
) -> None:
    """Login CSRF: a victim's browser fed someone else's callback link is not signed in."""
    callback = at_provider(start(browser))
    with sso_server.client() as victim:
        assert sso_error(victim.get(callback)) == "bad_state"
        assert victim.get("/api/v1/me").status_code == 401
    # The link is spent even for the browser that started it.
    assert sso_error(browser.get(callback)) == "bad_state"


def test_expired_state_is_refused(
    sso_server: LiveServer, browser: httpx.Client, person: dict[str, Any]
) -> None:
    callback = at_provider(start(browser))
    assert sso_server.core is not None
    db = sso_server.core.db

    async def age() -> None:
        async with db.write() as session:
            await session.execute(update(OidcPending).values(expires_at=utcnow()))

    sso_server.call(age())
    assert sso_error(browser.get(callback)) == "bad_state"


def test_provider_denies(
    browser: httpx.Client, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    provider.knobs.deny = True
    callback = at_provider(start(browser))
    assert "error=access_denied" in callback
    assert sso_error(browser.get(callback)) == "provider_error"
    event = last_login_event(admin)
    assert event["outcome"] == "failure" and event["details"]["reason"] == "provider_error"
    assert "access_denied" in event["details"]["detail"]
    page = browser.get("/login", params={"sso_error": "provider_error"})
    assert "did not sign you in" in page.text


@pytest.mark.parametrize(
    ("knobs", "why"),
    [
        (Knobs(sign_with_other_key=True), "bad_signature"),
        (Knobs(claims={"aud": "someone-else"}), "aud"),
        (Knobs(claims={"nonce": "not-the-nonce"}), "nonce"),
        (Knobs(claims={"iss": "https://impostor.example"}), "iss"),
        (
            Knobs(claims={"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}),
            "expired",
        ),
    ],
)
def test_invalid_id_token_is_refused(
    knobs: Knobs,
    why: str,
    browser: httpx.Client,
    admin: httpx.Client,
    provider: FakeProvider,
    person: dict[str, Any],
) -> None:
    provider.knobs = knobs
    users = len(admin.get("/api/v1/users").json())
    assert sso_error(sign_in(browser)) == "invalid_id_token"
    assert browser.get("/api/v1/me").status_code == 401
    event = last_login_event(admin)
    assert event["details"]["reason"] == "invalid_id_token"
    assert why in event["details"]["detail"]
    assert len(admin.get("/api/v1/users").json()) == users  # nobody was created


def test_token_endpoint_failure(
    browser: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    provider.knobs.token_endpoint_down = True
    assert sso_error(sign_in(browser)) == "provider_unavailable"


def test_disabled_user_is_refused(
    sso_server: LiveServer, admin: httpx.Client, person: dict[str, Any]
) -> None:
    person["preferred_username"] = "dora"
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
    assert admin.patch("/api/v1/users/dora", json={"disabled": True}).status_code == 200
    with sso_server.client() as browser:
        assert sso_error(sign_in(browser)) == "disabled"
        assert browser.get("/api/v1/me").status_code == 401
        assert "disabled" in browser.get("/login", params={"sso_error": "disabled"}).text
    event = last_login_event(admin)
    assert event["outcome"] == "failure" and event["actor"] == "dora"
    assert event["details"]["reason"] == "disabled"


def test_login_page_offers_single_sign_on(browser: httpx.Client) -> None:
    page = browser.get("/login", params={"next": "/fleet"})
    assert "Sign in with single sign-on" in page.text
    assert 'href="/api/v1/auth/oidc/login?next=/fleet"' in page.text
    evil = browser.get("/login", params={"next": "https://evil.example"})
    assert "evil.example" not in evil.text


def test_alg_none_and_hmac_with_the_client_secret_are_refused(
    browser: httpx.Client, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """Even when the provider's discovery document advertises them."""
    for forge in ("none", "hs256"):
        provider.knobs = Knobs(
            forge=forge,
            discovery={"id_token_signing_alg_values_supported": ["RS256", "HS256", "none"]},
        )
        assert sso_error(sign_in(browser)) == "invalid_id_token", forge
        assert browser.get("/api/v1/me").status_code == 401
        assert last_login_event(admin)["details"]["reason"] == "invalid_id_token"


# ----- users ---------------------------------------------------------------------------


def test_reserved_names_and_unverified_email_never_name_a_user(
    sso_server: LiveServer, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """ "admin", "system" (an audit actor), "admin-2" (what a taken "admin" becomes) and an
    e-mail address the provider does not vouch for are not names anyone gets."""
    people: list[dict[str, Any]] = [
        {"preferred_username": "admin"},
        {"preferred_username": "System"},
        {"preferred_username": "admin-2"},
        {"preferred_username": "anonymous"},
        {"email": "ceo@example.com", "email_verified": False},
        {"email": "cfo@example.com", "email_verified": "true"},  # a string is not a yes
    ]
    for claims in people:
        provider.person = {"sub": "p-" + secrets.token_hex(6), **claims}
        with sso_server.client() as browser:
            assert sign_in(browser).status_code == 303
            me = browser.get("/api/v1/me").json()
            assert me["username"].startswith("sso-"), (claims, me["username"])
            assert me["role"] == "operator"


def test_a_user_deleted_behind_the_apps_back_gets_a_new_account(
    sso_server: LiveServer, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """The identity link outlives its user only if the row was removed without the
    cascade; the next sign-in must then not fail with a 500."""
    person["preferred_username"] = "erin"
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        first = browser.get("/api/v1/me").json()
    assert sso_server.data_dir is not None
    with sqlite3.connect(sso_server.data_dir / "legator.db") as db:  # foreign keys off
        db.execute("DELETE FROM sessions WHERE user_id = ?", (first["user_id"],))
        db.execute("DELETE FROM users WHERE id = ?", (first["user_id"],))
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        again = browser.get("/api/v1/me").json()
    assert again["username"] == "erin" and again["user_id"] != first["user_id"]


@pytest.mark.postgres
def test_concurrent_first_sign_ins_never_fail(
    pg_url: str, tmp_path: Path, provider: FakeProvider
) -> None:
    """The same person twice at once, and several people wanting one name at once: the
    unique constraints catch the race, and every sign-in still ends with a user."""
    pg = {"database_url": pg_url, "secrets_kek": "ab" * 32}
    with sso_live_server(tmp_path / "data", provider, **pg) as server:
        assert server.core is not None and server.core.oidc is not None
        logins = server.core.oidc
        claims = {"preferred_username": "frank"}
        same = IdentityClaims(provider.issuer, "frank-sub", claims)
        others = [IdentityClaims(provider.issuer, f"other-{n}", claims) for n in range(8)]

        async def race() -> list[Any]:
            jobs = [logins._user_for(identity) for identity in [same] * 4 + others]
            return await asyncio.gather(*jobs)

        users = server.call(race())
        assert len({user.id for user in users[:4]}) == 1
        assert len({user.username for user in users[3:]}) == 9  # all different


# ----- linking an existing user --------------------------------------------------------

PASSWORD = "correct horse battery staple"


def local_user(admin: httpx.Client, role: str = "auditor") -> str:
    """A user created by an admin, with a password; returns its (fresh) name."""
    name = "local-" + secrets.token_hex(4)
    body = {"username": name, "password": PASSWORD, "role": role}
    response = admin.post("/api/v1/users", json=body)
    assert response.status_code == 201, response.text
    return name


def password_sign_in(client: httpx.Client, username: str) -> None:
    body = {"username": username, "password": PASSWORD}
    response = client.post("/api/v1/auth/login", json=body)
    assert response.status_code == 200, response.text


def start_link(browser: httpx.Client) -> str:
    """Open the link endpoint; return the provider's authorization URL it redirects to."""
    response = browser.get(LINK)
    assert response.status_code == 303, response.text
    return response.headers["location"]


def home_error(response: httpx.Response) -> str:
    """The reason a refused link lands on the home page with."""
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert location.path == "/", response.headers["location"]
    return parse_qs(location.query)["sso_error"][0]


def last_event(admin: httpx.Client, action: str) -> dict[str, Any]:
    events = admin.get("/api/v1/audit", params={"action": action, "limit": 1}).json()
    return events["events"][0]  # type: ignore[no-any-return]


def user_count(admin: httpx.Client) -> int:
    return len(admin.get("/api/v1/users").json())


def test_a_local_user_links_and_then_signs_in_through_the_provider(
    sso_server: LiveServer, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    name = local_user(admin)
    users = user_count(admin)
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        me = browser.get("/api/v1/me").json()
        page = browser.get("/")
        assert 'href="/api/v1/auth/oidc/link"' in page.text and "Link single sign-on" in page.text

        authorization_url = start_link(browser)
        assert authorization_url.startswith(provider.issuer + "/authorize?")
        done = browser.get(at_provider(authorization_url))
        assert done.status_code == 303 and done.headers["location"] == "/", done.text
        assert not any(
            c.startswith("legator_session=") for c in done.headers.get_list("set-cookie")
        )
        page = browser.get("/")
        assert f"linked to {provider.issuer}" in page.text
        assert "/api/v1/auth/oidc/link" not in page.text
        logout = browser.post("/api/v1/auth/logout", headers={"Origin": sso_server.url})
        assert logout.status_code == 204
        assert browser.get("/api/v1/me").status_code == 401

    # Through the provider now: the same user, the same role, and nobody new.
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        again = browser.get("/api/v1/me").json()
        assert again["user_id"] == me["user_id"] and again["username"] == name
        assert again["role"] == "auditor"
    assert user_count(admin) == users
    assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == [provider.issuer]
    listed = {u["username"]: u for u in admin.get("/api/v1/users").json()}
    assert listed[name]["sso_issuers"] == [provider.issuer]
    assert person["sub"] not in json.dumps(listed[name])  # the issuer only, not the sub

    event = last_event(admin, "auth.identity.link")
    assert event["outcome"] == "success" and event["actor"] == name
    assert event["target"] == f"user:{name}"
    assert event["details"]["issuer"] == provider.issuer
    assert event["details"]["subject"] == person["sub"] and not event["details"]["unchanged"]
    assert provider.token_requests[-1]["code"] not in json.dumps(event)  # never audited

    # Linking what is already yours changes nothing, and says so.
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        assert browser.get(at_provider(start_link(browser))).headers["location"] == "/"
    assert last_event(admin, "auth.identity.link")["details"]["unchanged"] is True
    assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == [provider.issuer]


def test_an_identity_linked_to_someone_else_is_refused(
    sso_server: LiveServer, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    person["preferred_username"] = "gina-" + secrets.token_hex(3)
    with sso_server.client() as first:
        assert sign_in(first).status_code == 303  # creates gina, linked to this identity
        gina = first.get("/api/v1/me").json()
    name = local_user(admin)
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        refused = browser.get(at_provider(start_link(browser)))
        assert home_error(refused) == "linked_to_another_user"
        assert browser.get("/api/v1/me").json()["username"] == name  # still signed in as before
        page = browser.get("/", params={"sso_error": "linked_to_another_user"})
        assert "already linked to another user" in page.text
    assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == []
    event = last_event(admin, "auth.identity.link")
    assert event["outcome"] == "failure" and event["actor"] == name
    assert event["details"]["reason"] == "linked_to_another_user"
    # Gina keeps her identity.
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        assert browser.get("/api/v1/me").json()["user_id"] == gina["user_id"]

    # Nor can someone who has an identity here link a second one from the same provider.
    provider.person = {**person, "sub": "another-" + secrets.token_hex(4)}
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        provider.person = {**person, "sub": "third-" + secrets.token_hex(4)}
        refused = browser.get(at_provider(start_link(browser)))
        assert home_error(refused) == "already_linked"


def test_linking_needs_a_browser_session(
    sso_server: LiveServer, admin: httpx.Client, person: dict[str, Any]
) -> None:
    with sso_server.client() as browser:
        response = browser.get(LINK)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert "legator_oidc" not in browser.cookies
    # An API key, even the admin's, cannot: it must not turn into a sign-in for its owner.
    response = admin.get(LINK)
    assert response.status_code == 403
    assert "browser session" in response.json()["error"]["message"]
    name = local_user(admin)
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        assert browser.get(LINK, params={"next": "https://evil.example"}).status_code == 400


def test_a_link_cannot_be_finished_by_another_browser_or_user(
    sso_server: LiveServer, admin: httpx.Client, person: dict[str, Any]
) -> None:
    """The callback of a link that A started, opened in B's (signed-in) browser, links
    nothing to anyone; nor does A's own browser once A has signed out, or in as B."""
    alice, bob = local_user(admin), local_user(admin)
    with sso_server.client() as a_browser, sso_server.client() as b_browser:
        password_sign_in(a_browser, alice)
        password_sign_in(b_browser, bob)
        callback = at_provider(start_link(a_browser))
        assert home_error(b_browser.get(callback)) == "bad_state"
        assert b_browser.get("/api/v1/me").json()["username"] == bob
        event = last_event(admin, "auth.identity.link")
        assert event["outcome"] == "failure" and event["details"]["reason"] == "bad_state"
        assert event["actor"] == alice  # whose link it was
        # The link is spent even for the browser that started it (which link it was is
        # forgotten with it, so this lands on the login page like any unknown state).
        assert sso_error(a_browser.get(callback)) == "bad_state"

        callback = at_provider(start_link(a_browser))
        a_browser.post("/api/v1/auth/logout", headers={"Origin": sso_server.url})
        password_sign_in(a_browser, bob)
        assert home_error(a_browser.get(callback)) == "session_changed"

        callback = at_provider(start_link(a_browser))  # started by bob this time
        a_browser.post("/api/v1/auth/logout", headers={"Origin": sso_server.url})
        assert sso_error(a_browser.get(callback)) == "session_changed"  # signed out: /login
    for name in (alice, bob):
        assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == []


def test_an_admin_unlinks_and_the_next_sign_in_makes_a_new_user(
    sso_server: LiveServer, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    person["preferred_username"] = "hana-" + secrets.token_hex(3)
    name = local_user(admin)
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        assert browser.get(at_provider(start_link(browser))).status_code == 303
        me = browser.get("/api/v1/me").json()
        # Only an admin unlinks.
        refused = browser.delete(
            f"/api/v1/users/{name}/identities", headers={"Origin": sso_server.url}
        )
        assert refused.status_code == 403

    unlinked = admin.delete(f"/api/v1/users/{name}/identities")
    assert unlinked.status_code == 200, unlinked.text
    assert unlinked.json()["username"] == name and unlinked.json()["sso_issuers"] == []
    event = last_event(admin, "auth.identity.unlink")
    assert event["target"] == f"user:{name}" and event["actor"] == "admin"
    assert event["details"] == {"issuer": provider.issuer, "subject": person["sub"]}
    again = admin.delete(f"/api/v1/users/{name}/identities")
    assert again.status_code == 404 and "no single sign-on identity" in again.text

    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        other = browser.get("/api/v1/me").json()
    assert other["user_id"] != me["user_id"]
    assert other["username"] == person["preferred_username"] and other["role"] == "operator"


def test_create_users_false_refuses_unlinked_identities(
    tmp_path: Path, provider: FakeProvider, person: dict[str, Any]
) -> None:
    with (
        sso_live_server(tmp_path / "data", provider, oidc_create_users=False) as server,
        server.client(server.admin_key) as admin,
    ):
        users = user_count(admin)
        with server.client() as browser:
            assert sso_error(sign_in(browser)) == "not_linked"
            assert browser.get("/api/v1/me").status_code == 401
            page = browser.get("/login", params={"sso_error": "not_linked"})
            assert "Sign in with your password" in page.text and "administrator" in page.text
        assert user_count(admin) == users  # nobody was created
        event = last_login_event(admin)
        assert event["outcome"] == "failure" and event["details"]["reason"] == "not_linked"

        # Linking still works, and then the identity signs in as that user.
        name = local_user(admin, role="viewer")
        with server.client() as browser:
            password_sign_in(browser, name)
            assert browser.get(at_provider(start_link(browser))).headers["location"] == "/"
        with server.client() as browser:
            assert sign_in(browser).status_code == 303
            assert browser.get("/api/v1/me").json()["username"] == name

        # Unlinked again, it is refused again rather than made a new user.
        assert admin.delete(f"/api/v1/users/{name}/identities").status_code == 200
        with server.client() as browser:
            assert sso_error(sign_in(browser)) == "not_linked"
        assert user_count(admin) == users + 1


# ----- unlinking yourself --------------------------------------------------------------

ME_IDENTITIES = "/api/v1/me/identities"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(
    request: pytest.FixtureRequest, provider: FakeProvider, tmp_path: Path
) -> Iterator[LiveServer]:
    """The module's server (SQLite), or one of its own on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sso_server")
        return
    pg = {"database_url": request.getfixturevalue("pg_url"), "secrets_kek": "ab" * 32}
    with sso_live_server(tmp_path / "data", provider, **pg) as server:
        yield server


def test_you_see_and_unlink_your_own_identity(
    backend: LiveServer, provider: FakeProvider, person: dict[str, Any]
) -> None:
    server, origin = backend, {"Origin": backend.url}
    with server.client(server.admin_key) as admin, server.client() as browser:
        name = local_user(admin)
        password_sign_in(browser, name)
        assert browser.get("/api/v1/me").json()["sso_issuers"] == []
        assert browser.get(at_provider(start_link(browser))).status_code == 303
        me = browser.get("/api/v1/me").json()
        assert me["sso_issuers"] == [provider.issuer]
        assert person["sub"] not in json.dumps(me)  # the issuer only, not the sub
        body = {"name": "tool", "scopes": ["inference"]}
        key = browser.post("/api/v1/keys", json=body, headers=origin).json()["key"]
        with server.client(key) as own_key:
            assert own_key.get("/api/v1/me").json()["sso_issuers"] == [provider.issuer]
        assert admin.get("/api/v1/me").json()["sso_issuers"] == []  # the admin's own: none
        with server.client() as nobody:
            assert nobody.delete(ME_IDENTITIES).status_code == 401

        # The cookie unlinks only from this server's own origin (what the page's fetch sends).
        for headers in ({}, {"Origin": "https://evil.example"}):
            refused = browser.delete(ME_IDENTITIES, headers=headers)
            assert refused.status_code == 403, refused.text
        assert browser.get("/api/v1/me").json()["sso_issuers"] == [provider.issuer]
        done = browser.delete(ME_IDENTITIES, headers=origin)
        assert done.status_code == 200, done.text
        assert done.json()["username"] == name and done.json()["sso_issuers"] == []
        assert browser.get("/api/v1/me").json()["sso_issuers"] == []
        assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == []
        event = last_event(admin, "auth.identity.unlink")
        assert event["actor"] == name and event["target"] == f"user:{name}"
        assert event["details"] == {"issuer": provider.issuer, "subject": person["sub"]}
        again = browser.delete(ME_IDENTITIES, headers=origin)
        assert again.status_code == 404 and "no single sign-on identity" in again.text

        # A key of yours that may manage your account may too (unlinking grants no sign-in);
        # a narrower one may not change your account at all.
        assert browser.get(at_provider(start_link(browser))).status_code == 303
        with server.client(key) as own_key:
            assert own_key.delete(ME_IDENTITIES).status_code == 403
        body = {"name": "all of mine", "scopes": ["*"]}
        full_key = browser.post("/api/v1/keys", json=body, headers=origin).json()["key"]
        with server.client(full_key) as own_key:
            assert own_key.delete(ME_IDENTITIES).status_code == 200
        assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == []
        assert last_event(admin, "auth.identity.unlink")["actor"] == name


def test_without_a_password_your_identity_stays_linked(
    backend: LiveServer, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """The identity is then the user's only way in: they cannot unlink it, an admin can."""
    person["preferred_username"] = "ivy-" + secrets.token_hex(3)
    with backend.client(backend.admin_key) as admin, backend.client() as browser:
        assert sign_in(browser).status_code == 303  # a new user, without a password
        me = browser.get("/api/v1/me").json()
        assert me["sso_issuers"] == [provider.issuer]
        refused = browser.delete(ME_IDENTITIES, headers={"Origin": backend.url})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "conflict" and "no password" in error["message"]
        assert browser.get("/api/v1/me").json()["sso_issuers"] == [provider.issuer]
        unlinked = admin.delete(f"/api/v1/users/{me['username']}/identities")
        assert unlinked.status_code == 200
        assert last_event(admin, "auth.identity.unlink")["actor"] == "admin"


def test_the_home_page_offers_to_unlink(
    sso_server: LiveServer, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    name = local_user(admin)
    with sso_server.client() as browser:
        password_sign_in(browser, name)
        assert "sso-unlink" not in browser.get("/").text
        assert browser.get(at_provider(start_link(browser))).status_code == 303
        page = browser.get("/").text
        assert f"linked to {provider.issuer}" in page
        assert 'id="sso-unlink" data-url="/api/v1/me/identities">Unlink</button>' in page
        # The script is a file of our own: the Content-Security-Policy runs no inline one.
        assert '<script src="/static/home.js" defer></script>' in page and "<script>" not in page
        script = browser.get("/static/home.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert 'method: "DELETE"' in script.text and "unlink.dataset.url" in script.text
        # What its same-origin fetch sends: the session cookie and this origin.
        done = browser.delete(ME_IDENTITIES, headers={"Origin": sso_server.url})
        assert done.status_code == 200, done.text
        page = browser.get("/").text
        assert "sso-unlink" not in page and 'href="/api/v1/auth/oidc/link"' in page


# ----- abuse ---------------------------------------------------------------------------


def test_one_client_cannot_flood_sign_ins_or_the_audit_log(
    sso_server: LiveServer, browser: httpx.Client, admin: httpx.Client, person: dict[str, Any]
) -> None:
    assert sso_server.core is not None and sso_server.core.oidc is not None
    attempts = sso_server.core.oidc.attempts
    attempts.limit = 3
    try:
        for _ in range(3):
            assert browser.get(LOGIN).status_code == 303
        refused = browser.get(LOGIN)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "too many" in refused.json()["error"]["message"]
        before = admin.get("/api/v1/audit", params={"action": "auth.login"}).json()["events"]
        for _ in range(5):
            response = browser.get(CALLBACK, params={"state": secrets.token_urlsafe(8)})
            assert sso_error(response) == "too_many_attempts"
        after = admin.get("/api/v1/audit", params={"action": "auth.login"}).json()["events"]
        assert after[0]["id"] == before[0]["id"]  # nothing written for those
        page = browser.get("/login", params={"sso_error": "too_many_attempts"})
        assert "Too many sign-in attempts" in page.text
    finally:
        attempts.limit = 60
        attempts.clear()


# ----- the provider, seen from the relying party ---------------------------------------


@pytest.fixture
async def rp(provider: FakeProvider) -> AsyncIterator[OidcProvider]:
    """A relying party of its own (empty caches) on the fake provider."""
    provider.knobs = Knobs()
    provider.hits.clear()
    settings = load_settings(
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_redirect_url="http://127.0.0.1:1" + CALLBACK,
    )
    relying_party = OidcProvider(settings)
    try:
        yield relying_party
    finally:
        await relying_party.aclose()


def id_token(provider: FakeProvider, key: RSAKey, header: dict[str, Any]) -> str:
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": CLIENT_ID, "sub": "s", "iat": now, "exp": now + 60}
    return jwt.encode({"alg": "RS256", **header}, {**claims, "nonce": "n"}, key)


@pytest.mark.parametrize(
    ("issuer", "field", "url", "allowed"),
    [
        ("https://id.example.com", "jwks_uri", "https://keys.example.com/jwks", True),
        ("https://id.example.com", "jwks_uri", "http://id.example.com/jwks", False),
        ("https://id.example.com", "token_endpoint", "http://127.0.0.1/token", False),
        ("http://127.0.0.1:5556", "jwks_uri", "http://127.0.0.1:5557/jwks", True),
        ("http://127.0.0.1:5556", "jwks_uri", "http://keys.example.com/jwks", False),
        ("http://127.0.0.1:5556", "token_endpoint", "http://10.0.0.7/token", False),
        ("https://id.example.com", "token_endpoint", "https://user:pw@id.example.com/t", False),
        ("https://id.example.com", "authorization_endpoint", "javascript:alert(1)", False),
    ],
)
def test_discovered_endpoints_must_be_https(
    issuer: str, field: str, url: str, allowed: bool
) -> None:
    """Unless the issuer and the endpoint are both on loopback: a loopback http issuer
    (allowed for development) cannot send us over plain http to another machine."""
    document = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "jwks_uri": issuer + "/jwks",
        field: url,
    }
    if allowed:
        assert getattr(parse_metadata(issuer, document), field) == url
    else:
        with pytest.raises(ProviderUnavailable, match=field):
            parse_metadata(issuer, document)
    with pytest.raises(ProviderUnavailable, match="names issuer"):
        parse_metadata("https://other.example.com", {**document, field: issuer + "/x"})


async def test_a_slow_provider_is_cut_off(rp: OidcProvider, provider: FakeProvider) -> None:
    """A deadline on the whole call, not only between two bytes: a provider that drips its
    answer cannot hold a sign-in (and the lock every other sign-in waits on)."""
    provider.knobs.drip_s = 0.5  # about ten seconds for the whole document
    rp.timeout_s = 1.0
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="did not answer within 1 s"):
        await rp.metadata()
    # Cut off, not the whole document read: that takes ten seconds (and raises nothing).
    assert time.monotonic() - started < 8


@pytest.mark.parametrize(
    ("knobs", "why"),
    [
        (Knobs(huge="discovery"), f"^discovery document .* larger than {MAX_DOCUMENT_BYTES} "),
        (Knobs(huge="jwks"), f"^key set .* larger than {MAX_DOCUMENT_BYTES} bytes"),
        (Knobs(huge="token"), f"^token endpoint .* larger than {MAX_DOCUMENT_BYTES} bytes"),
        (Knobs(deep=True), "^discovery document .* is not JSON"),  # beyond the recursion limit
    ],
    ids=["discovery", "jwks", "token", "deep"],
)
async def test_huge_or_deep_answers_are_refused(
    rp: OidcProvider, provider: FakeProvider, knobs: Knobs, why: str
) -> None:
    provider.knobs = knobs
    provider.grants["code"] = Grant(rp.redirect_url, "challenge", "n", {})
    with pytest.raises(ProviderUnavailable, match=why):
        await rp.metadata()
        await rp._key_set()
        await rp.exchange_code("code", "v" * 43)


async def test_a_failing_provider_is_not_asked_again_at_once(
    rp: OidcProvider, provider: FakeProvider
) -> None:
    """Each /login would otherwise send a request to a provider that is down (and queue
    behind the one before): the failure is remembered for a few seconds."""
    provider.knobs.discovery_status = 500
    for _ in range(5):
        with pytest.raises(ProviderUnavailable, match="HTTP 500"):
            await rp.metadata()
    assert provider.hits["discovery"] == 1


async def test_unknown_key_ids_refetch_the_keys_once(
    rp: OidcProvider, provider: FakeProvider
) -> None:
    """Tokens naming a key we do not have refetch the key set (the provider may have
    rotated), but once per JWKS_MIN_REFRESH_S however many arrive at once."""
    good = id_token(provider, provider.key, {"kid": "k1"})
    identity = await rp.verify_id_token(good, nonce="n", access_token=None)
    assert identity.subject == "s" and provider.hits["jwks"] == 1
    rp._keys.fetched_at -= 31  # old enough to refresh
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"}, private=True)
    forged = id_token(provider, stranger, {"kid": "k9"})
    results = await asyncio.gather(
        *[rp.verify_id_token(forged, nonce="n", access_token=None) for _ in range(10)],
        return_exceptions=True,
    )
    assert all(isinstance(r, OidcError) and r.reason == "invalid_id_token" for r in results)
    assert provider.hits["jwks"] == 2
    assert "unknown key id 'k9'" in str(results[0])
    with pytest.raises(OidcError):
        await rp.verify_id_token(forged, nonce="n", access_token=None)
    assert provider.hits["jwks"] == 2


async def test_a_token_without_kid_needs_a_single_key(
    rp: OidcProvider, provider: FakeProvider
) -> None:
    """OIDC Core §10.1: with several keys the token must say which. Refused outright: a
    missing kid is no sign of rotated keys, so it does not refetch them either."""
    no_kid = id_token(provider, provider.key, {})
    assert (await rp.verify_id_token(no_kid, nonce="n", access_token=None)).subject == "s"
    provider.knobs.extra_key = True
    rp._keys.value = None
    await rp._key_set()
    assert provider.hits["jwks"] == 2
    rp._keys.fetched_at -= 31  # old enough that a refresh would happen
    with pytest.raises(OidcError, match="no 'kid'"):
        await rp.verify_id_token(no_kid, nonce="n", access_token=None)
    assert provider.hits["jwks"] == 2


def provider_warnings(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The lines the relying party logged since the last call (JSON lines on stdout)."""
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return [line for line in lines if line.get("logger") == "legator.auth.oidc"]


@pytest.mark.parametrize("failure", ["http_500", "not_json", "unreachable"])
async def test_a_stale_discovery_document_outlives_a_failed_refresh(
    rp: OidcProvider,
    provider: FakeProvider,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """Sign-ins go on with the expired document, for at most STALE_GRACE_S past its expiry,
    with one warning per failed refresh (and no secret in it)."""
    configure_logging("info", "json")
    document = await rp.metadata()
    assert provider.hits["discovery"] == 1
    if failure == "http_500":
        provider.knobs.discovery_status = 500
    elif failure == "not_json":
        provider.knobs.deep = True
    else:
        monkeypatch.setattr(rp, "issuer", f"http://127.0.0.1:{free_port()}")
    rp._metadata.fetched_at -= CACHE_TTL_S + 1  # expired
    capsys.readouterr()
    for _ in range(5):
        assert await rp.metadata() is document
    url = await rp.authorization_url(state="s", nonce="n", code_verifier="v" * 43)
    assert url.startswith(document.authorization_endpoint)
    [warning] = provider_warnings(capsys)  # once: the failure is remembered FAILURE_TTL_S
    assert warning["level"] == "warning" and warning["document"] == "discovery document"
    assert warning["expired_s_ago"] == 1 and "discovery document at" in warning["error"]
    assert CLIENT_SECRET not in json.dumps(warning)
    rp._metadata._failure = None  # the next sign-in tries again, and warns again
    assert await rp.metadata() is document
    assert len(provider_warnings(capsys)) == 1

    rp._metadata._failure = None
    rp._metadata.fetched_at -= STALE_GRACE_S  # now a day past its expiry: no more
    with pytest.raises(ProviderUnavailable):
        await rp.metadata()

    provider.knobs = Knobs()  # back: a new document
    monkeypatch.undo()
    rp._metadata._failure = None
    fresh = await rp.metadata()
    assert fresh == document and fresh is not document


async def test_stale_keys_outlive_a_failed_refresh_but_unknown_kids_still_refetch(
    rp: OidcProvider, provider: FakeProvider, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    good = id_token(provider, provider.key, {"kid": "k1"})
    assert (await rp.verify_id_token(good, nonce="n", access_token=None)).subject == "s"
    assert provider.hits["jwks"] == 1
    provider.knobs.jwks_status = 503
    rp._keys.fetched_at -= CACHE_TTL_S + 1  # expired
    capsys.readouterr()
    assert (await rp.verify_id_token(good, nonce="n", access_token=None)).subject == "s"
    assert provider.hits["jwks"] == 2
    [warning] = provider_warnings(capsys)
    assert warning["document"] == "key set" and "HTTP 503" in warning["error"]

    # A key id we do not hold still asks the provider (once the failure is forgotten), and
    # fails as unreachable: the stale keys do not stand in for a rotation we cannot see.
    rp._keys._failure = None
    rotated = id_token(provider, provider.second_key, {"kid": "k2"})
    with pytest.raises(ProviderUnavailable, match="HTTP 503"):
        await rp.verify_id_token(rotated, nonce="n", access_token=None)
    assert provider.hits["jwks"] == 3
    provider.knobs = Knobs(extra_key=True)
    rp._keys._failure = None
    assert (await rp.verify_id_token(rotated, nonce="n", access_token=None)).subject == "s"
    assert provider.hits["jwks"] == 4


async def test_basic_client_authentication_form_encodes_id_and_secret() -> None:
    """RFC 6749 §2.3.1: the client id and secret are each form-urlencoded, then joined with
    ':' and base64-encoded; the fake provider decodes them the same way."""
    client_id, secret = "legator:prod client", "p%ss+w rd:é€/~"
    fake = FakeProvider(client_id=client_id, client_secret=secret).start()
    settings = {
        "oidc_issuer": fake.issuer,
        "oidc_client_id": client_id,
        "oidc_redirect_url": "http://127.0.0.1:1" + CALLBACK,
    }
    good = OidcProvider(load_settings(**settings, oidc_client_secret=secret))
    wrong = OidcProvider(load_settings(**settings, oidc_client_secret=secret + "x"))
    try:
        for code in ("c1", "c2"):
            fake.grants[code] = Grant(
                good.redirect_url, create_s256_code_challenge("v" * 43), "n", {"sub": "s"}
            )
        answer = await good.exchange_code("c1", "v" * 43)
        encoded = base64.b64decode(fake.token_auth[-1].removeprefix("Basic ")).decode()
        assert encoded == "legator%3Aprod+client:p%25ss%2Bw+rd%3A%C3%A9%E2%82%AC%2F~"
        identity = await good.verify_id_token(answer["id_token"], nonce="n", access_token=None)
        assert identity.subject == "s"
        with pytest.raises(OidcError, match="invalid_client"):
            await wrong.exchange_code("c2", "v" * 43)
    finally:
        await good.aclose()
        await wrong.aclose()
        fake.stop()


async def test_the_authorization_url_opens_no_tls_context(
    rp: OidcProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/login is public: building the URL must not cost a TLS context (certificates read
    and parsed, tens of milliseconds of CPU) per request."""
    await rp.metadata()
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    url = await rp.authorization_url(state="s", nonce="n", code_verifier="v" * 43)
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] == ["n"]
    assert query["redirect_uri"] == [rp.redirect_url] and query["client_id"] == [CLIENT_ID]
    assert loads == []


# ----- configuration -------------------------------------------------------------------


def test_not_configured_means_404(api: httpx.Client, server: LiveServer) -> None:
    with server.client() as browser:
        for path in (LOGIN, CALLBACK):
            response = browser.get(path)
            assert response.status_code == 404
            assert "LEGATOR_OIDC_ISSUER" in response.json()["error"]["message"]
        assert "single sign-on" not in browser.get("/login").text


def test_unreachable_provider(tmp_path: Path) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        live_server(
            tmp_path / "data",
            oidc_issuer=issuer,
            oidc_client_id=CLIENT_ID,
            oidc_redirect_url="http://127.0.0.1:1" + CALLBACK,
        ) as server,
        server.client() as browser,
    ):
        assert sso_error(browser.get(LOGIN)) == "provider_unavailable"
        page = browser.get("/login", params={"sso_error": "provider_unavailable"})
        assert "cannot be reached" in page.text


@pytest.mark.postgres
def test_flow_on_postgresql(
    pg_url: str, tmp_path: Path, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """The pending sign-in is taken with DELETE … RETURNING: single use on PostgreSQL too."""
    pg = {"database_url": pg_url, "secrets_kek": "ab" * 32}
    with sso_live_server(tmp_path / "data", provider, **pg) as server:
        with server.client() as browser:
            callback = at_provider(start(browser))
            assert browser.get(callback).status_code == 303
            assert browser.get("/api/v1/me").json()["role"] == "viewer"
            assert sso_error(browser.get(callback)) == "bad_state"
            assert sign_in(browser).status_code == 303  # the same user again
        with server.client(server.admin_key) as admin:
            users = [u["username"] for u in admin.get("/api/v1/users").json()]
            assert users.count("alice-example") == 1


def test_a_name_shaped_like_another_users_id_takes_nothing_of_theirs(
    sso_server: LiveServer, admin: httpx.Client, provider: FakeProvider, person: dict[str, Any]
) -> None:
    """Users are named by id or by username (``/users/{ref}``, the keys' owner): a provider's
    user calling itself by the first admin's id must get neither that name nor a key that
    acts as the admin."""
    admin_id = admin.get("/api/v1/me").json()["user_id"]
    person["preferred_username"] = admin_id
    with sso_server.client() as browser:
        assert sign_in(browser).status_code == 303
        me = browser.get("/api/v1/me").json()
        assert me["role"] == "operator" and me["user_id"] != admin_id
        assert me["username"] != admin_id
        created = browser.post(
            "/api/v1/keys", json={"name": "mine"}, headers={"Origin": sso_server.url}
        )
        assert created.status_code == 201, created.text
        assert created.json()["user_id"] == me["user_id"]
        with sso_server.client(created.json()["key"]) as keyed:
            assert keyed.get("/api/v1/me").json()["role"] == "operator"
    assert admin.get(f"/api/v1/users/{admin_id}").json()["username"] == "admin"
    admin.delete(f"/api/v1/users/{me['user_id']}")
