"""Shared fixtures: a live control plane with an admin key and clients for each role."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from legator.core.logging import configure_logging
from tests.support import LiveServer, fresh_pg_database, live_server

configure_logging("info", "json")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the machine's real PostgreSQL server, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/legator.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client authenticated with the first-start admin key."""
    with server.client(server.admin_key) as client:
        yield client


@pytest.fixture
def make_user(api: httpx.Client, server: LiveServer):  # type: ignore[no-untyped-def]
    """Create a user with a role and return an authenticated client for them."""
    clients: list[httpx.Client] = []

    def _make(role: str, username: str | None = None) -> httpx.Client:
        name = username or f"{role}-user"
        response = api.post(
            "/api/v1/users",
            json={"username": name, "password": "correct horse battery", "role": role},
        )
        assert response.status_code == 201, response.text
        key = api.post("/api/v1/keys", json={"name": "t", "user": name}).json()["key"]
        client = server.client(key)
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.close()


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test means a dependency is missing: that is a failure."""
    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nCI: {len(_skipped)} test(s) skipped, which CI treats as failure:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
