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


def test_with_authentication_off_a_rebound_page_cannot_name_an_address_itself(
    open_server: LiveServer,
) -> None:
    """The rebound page is same-origin with its own name, so it may add any header to its
    fetch(): an X-Forwarded-Host naming an address must not pass for the name the browser
    reached the server by (its Host), or the page reads what an admin reads."""
    port = open_server.port
    with httpx.Client(base_url=open_server.url) as browser:
        for forwarded in (f"127.0.0.1:{port}", f"localhost:{port}"):
            rebound = browser.get(
                "/api/v1/audit",
                headers={"Host": f"evil.example:{port}", "X-Forwarded-Host": forwarded},
            )
            assert rebound.status_code == 403 and "localhost" in rebound.text, rebound.text
        # What a loopback proxy that rewrites Host sends still works when it names an address.
        proxied = browser.get(
            "/api/v1/me",
            headers={"Host": f"127.0.0.1:{port}", "X-Forwarded-Host": f"localhost:{port}"},
        )
        assert proxied.status_code == 200, proxied.text


def test_a_malformed_origin_or_host_is_refused_not_an_internal_error(
    server: LiveServer, api: httpx.Client, open_server: LiveServer
) -> None:
    """A name that does not parse as a URL's (an unclosed IPv6 bracket) is refused like any
    other site's, without an unhandled error (and its traceback in the log) per request."""
    created = api.post(
        "/api/v1/users",
        json={"username": "mallory", "password": "correct horse battery", "role": "viewer"},
    )
    assert created.status_code == 201
    form = {"username": "mallory", "password": "correct horse battery", "next": "/"}
    bad = {"Origin": "http://[evil"}
    with httpx.Client(base_url=server.url) as browser:
        assert browser.post("/login", data=form, headers=bad).status_code == 403
        signed_in = browser.post("/login", data=form, headers={"Origin": server.url})
        assert signed_in.status_code == 303
        assert browser.post("/api/v1/auth/logout", headers=bad).status_code == 403
    with httpx.Client(base_url=open_server.url) as browser:
        assert browser.post("/api/v1/tokens", headers=bad).status_code == 403
        for header in ("Host", "X-Forwarded-Host"):
            refused = browser.get("/api/v1/me", headers={header: "[evil"})
            assert refused.status_code == 403, (header, refused.text)
