"""Requests another site's page makes a browser send: refused where they would act as the
browser's user (sign-in) or, with authentication off, as an admin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer, live_server

EVIL = {"Origin": "https://evil.example"}


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data", auth=False) as server:
        yield server


def test_with_authentication_off_other_sites_cannot_act_as_admin(open_server: LiveServer) -> None:
    with httpx.Client(base_url=open_server.url) as browser:
        refused = browser.post("/api/v1/tokens", headers=EVIL)
        assert refused.status_code == 403 and "cross-site" in refused.text
        # A local client (the CLI, curl) sends no Origin and keeps working.
        assert browser.post("/api/v1/tokens").status_code == 201
        own = {"Origin": open_server.url}
        assert browser.post("/api/v1/tokens", headers=own).status_code == 201


def test_with_authentication_off_a_rebound_name_is_refused(open_server: LiveServer) -> None:
    """A page of evil.example whose name now resolves to 127.0.0.1 is same-origin with it."""
    with httpx.Client(base_url=open_server.url) as browser:
        rebound = browser.post(
            "/api/v1/users",
            json={"username": "mallory", "password": "correct horse battery", "role": "admin"},
            headers={"Host": "evil.example", "Origin": "http://evil.example"},
        )
        assert rebound.status_code == 403 and "localhost" in rebound.text
        port = open_server.port
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert browser.get("/api/v1/me", headers={"Host": host}).status_code == 200


def test_another_sites_page_cannot_sign_the_browser_in(
    server: LiveServer, api: httpx.Client
) -> None:
    created = api.post(
        "/api/v1/users",
        json={"username": "mallory", "password": "correct horse battery", "role": "viewer"},
    )
    assert created.status_code == 201
    form = {"username": "mallory", "password": "correct horse battery", "next": "/"}
    with httpx.Client(base_url=server.url) as browser:
        forced = browser.post("/login", data=form, headers=EVIL)
        assert forced.status_code == 403 and "legator_session" not in forced.cookies
        own = browser.post("/login", data=form, headers={"Origin": server.url})
        assert own.status_code == 303 and "legator_session" in own.cookies
