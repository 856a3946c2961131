"""Signing out on a shared computer, in a real browser (headless Chromium, as in
test_browser.py): the Back button must not bring the signed-in page back from a cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from tests.support import LiveServer
from tests.web.test_browser import chromium  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:  # noqa: F811
    context = chromium.new_context()
    yield context.new_page()
    context.close()


def test_back_after_sign_out_shows_no_account(page: Page, server: LiveServer) -> None:
    assert server.credentials is not None
    page.goto(server.url + "/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", server.credentials.password)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/")
    assert "Welcome, admin" in page.inner_text("main")

    page.click("text=Sign out")
    page.wait_for_url(server.url + "/login")
    page.go_back()
    page.wait_for_load_state()
    assert "Welcome, admin" not in page.content(), "Back showed the signed-out account"
