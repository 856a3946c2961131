"""Fixtures: a fake tailscaled LocalAPI speaking the real whois JSON on a unix socket, and a
real legerd (store, sockets, uvicorn with the peer-credential protocol) in a thread."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from legator.secrets.crypto import Kek
from legator.secrets.pgstore import SCHEMA, PgSecretStore, libpq_url, translate_sql
from legator.secrets.server import Legerd, LegerdConfig
from legator.secrets.store import SecretStore, SqlStore
from tests.support import free_port

SETEC_HEADERS = {"Content-Type": "application/json", "Sec-X-Tailscale-No-Browsers": "setec"}


def whois_user(login: str, grants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A whois answer for a user's (untagged) node, in tailscaled's JSON shape."""
    return {
        "Node": {
            "ID": 101,
            "StableID": "nStable101",
            "Name": f"{login.split('@')[0]}-laptop.example.ts.net.",
            "User": 11,
            "Addresses": ["100.64.0.11/32"],
            "Tags": None,
        },
        "UserProfile": {
            "ID": 11,
            "LoginName": login,
            "DisplayName": login.split("@")[0].title(),
            "ProfilePicURL": "",
        },
        "CapMap": {"tailscale.com/cap/secrets": grants} if grants is not None else {},
    }


def whois_tagged(tags: list[str], grants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "Node": {
            "ID": 202,
            "StableID": "nStable202",
            "Name": "web-1.example.ts.net.",
            "User": 12345,
            "Addresses": ["100.64.0.22/32"],
            "Tags": tags,
        },
        "UserProfile": {
            "ID": 12345,
            "LoginName": "tagged-devices",
            "DisplayName": "tagged devices",
            "ProfilePicURL": "",
        },
        "CapMap": {"tailscale.com/cap/secrets": grants} if grants is not None else {},
    }


class FakeTailscale:
    """tailscaled's LocalAPI ``GET /localapi/v0/whois?addr=IP:PORT``, answering per source IP."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identities: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []

        async def whois(request: Request) -> Response:
            addr = request.query_params.get("addr", "")
            self.calls.append(addr)
            ip = addr.rsplit(":", 1)[0].strip("[]")
            if ip not in self.identities:
                return PlainTextResponse(f"no match for IP:port {addr}\n", status_code=404)
            return JSONResponse(self.identities[ip])

        app = Starlette(routes=[Route("/localapi/v0/whois", whois)])
        self.server = uvicorn.Server(uvicorn.Config(app, uds=str(path), log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeTailscale:
        self.thread.start()
        wait_for(lambda: self.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_for(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


class LegerdThread:
    def __init__(self, config: LegerdConfig) -> None:
        self.config = config
        self.legerd = Legerd(config)
        self.thread = threading.Thread(target=self.legerd.run, daemon=True)
        self.url = f"http://{config.listen}" if config.listen else None

    def __enter__(self) -> LegerdThread:
        self.thread.start()
        wait_for(lambda: self.legerd.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.legerd.stop()
        self.thread.join(timeout=20)

    def tcp(self, source_ip: str = "127.0.0.1", headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        transport = httpx.HTTPTransport(local_address=source_ip)
        return httpx.Client(
            base_url=self.url or "", transport=transport, headers=headers or SETEC_HEADERS
        )

    def unix(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.config.socket_path))
        return httpx.Client(base_url="http://legerd", transport=transport, headers=SETEC_HEADERS)

    @property
    def audit_lines(self) -> list[dict[str, Any]]:
        import json

        text = self.config.audit_path.read_text()
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other local users can reach (pytest's tmp_path is root-only)."""
    with tempfile.TemporaryDirectory(prefix="legerd-test-") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


@pytest.fixture
def tailscale(shared_dir: Path) -> Iterator[FakeTailscale]:
    with FakeTailscale(shared_dir / "tailscaled.sock") as fake:
        yield fake


def make_config(state: Path, sock_dir: Path, tailscale: FakeTailscale | None, **kw: Any):  # type: ignore[no-untyped-def]
    return LegerdConfig(
        state_dir=state,
        listen=kw.pop("listen", f"127.0.0.1:{free_port()}"),
        socket_path=sock_dir / "legerd.sock",
        tailscale_socket=tailscale.path if tailscale else None,
        **kw,
    )


@pytest.fixture
def legerd(tmp_path: Path, shared_dir: Path, tailscale: FakeTailscale) -> Iterator[LegerdThread]:
    with LegerdThread(make_config(tmp_path / "state", shared_dir, tailscale)) as running:
        yield running


@pytest.fixture
def dev_legerd(tmp_path: Path, shared_dir: Path) -> Iterator[LegerdThread]:
    with LegerdThread(make_config(tmp_path / "state", shared_dir, None, dev=True)) as running:
        yield running


@dataclass
class Backend:
    """A store backend for the behaviour suite: how to open a store on its database, and
    raw SQL on that database (SQLite's ``?`` placeholders on both) to tamper with rows."""

    name: str
    open: Callable[[Kek], SqlStore]
    raw: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def _sqlite_backend(path: Path) -> Backend:
    def raw(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(path, isolation_level=None) as db:
            return db.execute(sql, params).fetchall()

    return Backend("sqlite", lambda kek: SecretStore(path, kek), raw)


def _pg_backend(url: str) -> Backend:
    def raw(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            libpq_url(url), autocommit=True, options=f"-c search_path={SCHEMA}"
        ) as db:
            cur = db.execute(translate_sql(sql), params)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

    return Backend("postgresql", lambda kek: PgSecretStore(url, kek), raw)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path / "secrets.db")
    return _pg_backend(request.getfixturevalue("pg_url"))
