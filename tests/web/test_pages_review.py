"""The sign-in and home pages as a shared computer and a tired operator meet them: a page
with the account on it is never stored, and "Sign out" works after the session ended."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServer

EVIL = {"Origin": "https://evil.example"}


@pytest.fixture
def browser(server: LiveServer) -> Iterator[httpx.Client]:
    """A client signed in as the admin through the sign-in form, as a browser is."""
    assert server.credentials is not None
    with server.client(follow_redirects=False) as client:
        signed_in = client.post(
            "/login",
            data={"username": "admin", "password": server.credentials.password},
            headers={"Origin": server.url},
        )
        assert signed_in.status_code == 303, signed_in.text
        yield client


def test_pages_with_the_account_are_never_stored(server: LiveServer, browser: httpx.Client) -> None:
    home = browser.get("/")
    assert home.status_code == 200 and "admin" in home.text
    assert home.headers.get("cache-control") == "no-store", "the account page may be cached"
    with server.client() as anonymous:
        form = anonymous.get("/login", params={"next": "/"})
        refused = anonymous.post("/login", data={"username": "admin", "password": "nope"})
    assert form.headers.get("cache-control") == "no-store"
    assert refused.status_code == 401 and refused.headers.get("cache-control") == "no-store"


def test_sign_out_after_the_session_ended_goes_to_the_sign_in_page(
    server: LiveServer, browser: httpx.Client
) -> None:
    """The session ended elsewhere (another tab signed out, it expired, an admin disabled the
    user): the page's "Sign out" button must still sign out, not answer with a JSON error."""
    cookie = browser.cookies["legator_session"]
    with server.client(cookies={"legator_session": cookie}) as other_tab:
        ended = other_tab.post("/api/v1/auth/logout", headers={"Origin": server.url})
        assert ended.status_code == 204
    signed_out = browser.post("/logout", headers={"Origin": server.url})
    assert signed_out.status_code == 303, signed_out.text
    assert signed_out.headers["location"] == "/login"
    assert 'legator_session=""' in signed_out.headers["set-cookie"]


def test_sign_out_ends_the_session_and_refuses_other_sites(
    server: LiveServer, browser: httpx.Client
) -> None:
    cookie = browser.cookies["legator_session"]
    forged = browser.post("/logout", headers=EVIL)
    assert forged.status_code == 403
    assert browser.get("/api/v1/me").status_code == 200
    signed_out = browser.post("/logout", headers={"Origin": server.url})
    assert signed_out.status_code == 303 and signed_out.headers["location"] == "/login"
    with server.client(cookies={"legator_session": cookie}) as replay:
        assert replay.get("/api/v1/me").status_code == 401
        assert replay.get("/", follow_redirects=False).headers["location"] == "/login"
