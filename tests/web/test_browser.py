"""The web pages in a real browser: Debian's Chromium, headless, driven by Playwright (which
never downloads a browser of its own here). Signing in with the form and through single
sign-on, linking an identity and unlinking it with the home page's button: the page's script
runs under its Content-Security-Policy, and its fetch carries what the server asks of a
cookie-authenticated write."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.core.fake_oidc import FakeProvider
from tests.core.test_oidc import PASSWORD, last_event, local_user, sso_live_server
from tests.support import LiveServer

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, on a machine without a network beyond loopback (MACHINE-NOTES.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make system-deps` (as root) installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(
    provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    with sso_live_server(tmp_path_factory.mktemp("web") / "data", provider) as live:
        yield live


@pytest.fixture
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.admin_key) as client:
        yield client


@pytest.fixture
def problems() -> list[str]:
    """The page's script errors and console errors (a Content-Security-Policy refusal is
    one, and so is a failed request): the test fails on any it does not take out."""
    return []


@pytest.fixture
def page(chromium: Browser, provider: FakeProvider, problems: list[str]) -> Iterator[Page]:
    """A fresh browser profile, and a fresh person at the provider."""
    provider.person = {"sub": "sub-" + secrets.token_hex(6), "preferred_username": "web-user"}
    context = chromium.new_context()
    page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"{message.text} at {message.location['url']}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == []


def sign_in_with_the_form(page: Page, server: LiveServer, username: str) -> None:
    page.goto(server.url + "/")
    assert page.url == server.url + "/login"  # sent there, signed out
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/")
    assert username in page.inner_text("main")


def sso_controls(page: Page) -> dict[str, int]:
    """How many Unlink buttons and Link links the home page shows."""
    return {
        "unlink": page.locator("#sso-unlink").count(),
        "link": page.locator("a[href='/api/v1/auth/oidc/link']").count(),
    }


def test_link_then_unlink_single_sign_on_from_the_home_page(
    page: Page, server: LiveServer, provider: FakeProvider, admin: httpx.Client
) -> None:
    name = local_user(admin)
    sign_in_with_the_form(page, server, name)
    assert sso_controls(page) == {"unlink": 0, "link": 1}

    page.click("a[href='/api/v1/auth/oidc/link']")  # to the provider and back
    page.wait_for_url(server.url + "/")
    assert f"linked to {provider.issuer}" in page.inner_text("p.sso")
    assert sso_controls(page) == {"unlink": 1, "link": 0}

    page.once("dialog", lambda dialog: dialog.dismiss())  # "Unlink…?" — no
    page.click("#sso-unlink")
    assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == [provider.issuer]

    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_navigation():
        page.click("#sso-unlink")
    assert sso_controls(page) == {"unlink": 0, "link": 1}
    assert admin.get(f"/api/v1/users/{name}").json()["sso_issuers"] == []
    assert last_event(admin, "auth.identity.unlink")["actor"] == name

    page.click("text=Sign out")
    page.wait_for_url(server.url + "/login")
    page.goto(server.url + "/")
    assert page.url == server.url + "/login"  # the session is over


def test_a_user_without_a_password_is_told_why_unlinking_is_refused(
    page: Page, server: LiveServer, admin: httpx.Client, problems: list[str]
) -> None:
    page.goto(server.url + "/login")
    page.click("text=Sign in with single sign-on")  # a new user, made at the first sign-in
    page.wait_for_url(server.url + "/")
    assert sso_controls(page)["unlink"] == 1

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sso-unlink")
    error = page.locator("#sso-unlink-error")
    error.wait_for(state="visible")
    assert "you have no password" in error.inner_text()
    assert problems == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
        f" at {server.url}/api/v1/me/identities"
    ]
    problems.clear()
    assert page.locator("#sso-unlink").is_enabled()  # may try again
    linked = [u for u in admin.get("/api/v1/users").json() if u["sso_issuers"]]
    assert [u["username"] for u in linked] == ["web-user"]
