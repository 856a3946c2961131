"""Test helpers: the real app under uvicorn on a free loopback port, and `legator serve` as
a real process."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI

from legator.app import create_app
from legator.core.auth.service import InitialCredentials
from legator.core.config import Settings
from legator.core.http.protocol import GuardedHttpToolsProtocol
from legator.core.runtime import Core, build_core

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = TypeVar("T")


async def until(predicate: Callable[[], Any], timeout: float = 10) -> None:
    """Wait (on the event loop) until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The whole app, in this process, served by uvicorn from a background thread."""

    def __init__(
        self,
        data_dir: Path | None,
        *,
        customize: Callable[[FastAPI, Core], None] | None = None,
        **settings: Any,
    ) -> None:
        self.data_dir = data_dir
        self.settings_overrides = settings
        self.customize = customize
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.credentials: InitialCredentials | None = None
        self.core: Core | None = None
        self.app: FastAPI | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop

    @property
    def admin_key(self) -> str:
        assert self.credentials is not None, "no first start happened on this data dir"
        return self.credentials.api_key

    def _remember(self, creds: InitialCredentials) -> None:
        self.credentials = creds

    def start(self) -> LiveServer:
        settings = Settings(
            addr=f"127.0.0.1:{self.port}", data_dir=self.data_dir, **self.settings_overrides
        )
        self.core = build_core(settings)

        async def remember_loop() -> None:
            self.loop = asyncio.get_running_loop()

        self.core.startup_hooks.append(remember_loop)
        self.app = create_app(core=self.core, on_first_start=self._remember)
        if self.customize:
            self.customize(self.app, self.core)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=GuardedHttpToolsProtocol,  # as `legator serve` runs it
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's own event loop (where its database lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=20)
        self._server = self._thread = None

    def restart(self) -> LiveServer:
        self.stop()
        return self.start()

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, **{"timeout": 30, **kwargs})


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one ``error: …`` line a CLI printed on failing with ``code``, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class ServerProcess:
    """`legator serve` as a separate process, the way an operator runs it."""

    def __init__(self, data_dir: Path, *, log_path: Path | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path  # where its log lines (stdout) go; unset: discarded
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LEGATOR_DATA_DIR": str(data_dir),
            "LEGATOR_ADDR": f"127.0.0.1:{self.port}",
            **env,
        }
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = ""

    def start(self, timeout: float = 30) -> ServerProcess:
        log = self.log_path.open("ab") if self.log_path else None
        self.proc = subprocess.Popen(
            [str(BIN / "legator"), "serve"],
            env=self.env,
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if log is not None:
            log.close()  # the child has its own copy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"legator serve exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("legator serve did not become healthy")

    def stop(self) -> str:
        """Stop cleanly (SIGTERM) and return everything it wrote to stderr."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.stderr = err
        return err


def parse_credentials(stderr: str) -> tuple[str, str]:
    password = re.search(r"admin password: (\S+)", stderr)
    key = re.search(r"admin API key:\s+(lgk_[0-9a-f]{64})", stderr)
    assert password and key, f"no credentials in: {stderr!r}"
    return password.group(1), key.group(1)


@contextmanager
def live_server(data_dir: Path | None, **settings: Any) -> Iterator[LiveServer]:
    server = LiveServer(data_dir, **settings).start()
    try:
        yield server
    finally:
        server.stop()


def first_started(data_dir: Path) -> str:
    """The SQLite URL of the database in ``data_dir``, made by a server's first start there."""
    with live_server(data_dir):
        pass
    return f"sqlite+aiosqlite:///{data_dir / 'legator.db'}"


def eventually(read: Callable[[], T], expected: T, timeout: float = 10) -> None:
    """Poll ``read()`` until it gives ``expected``; fails showing the last value read."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, not {expected!r}"
        time.sleep(0.05)


NATS_URL = "nats://127.0.0.1:4222"  # the machine's NATS server, shared by every test


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def fresh_pg_database(options: str = "") -> Iterator[str]:
    """A new database on the machine's real PostgreSQL server (``options`` follow its CREATE
    DATABASE), dropped afterwards."""
    name = "legator_test_" + secrets.token_hex(4)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}" {options}'.rstrip()))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def cluster_settings(pg_url: str, nats_url: str = NATS_URL, **extra: Any) -> dict[str, Any]:
    """What every replica of one test shares; the subject prefix keeps parallel tests apart."""
    return {
        "database_url": pg_url,
        "signing_key": secrets.token_hex(32),
        "secrets_kek": secrets.token_hex(32),
        "nats_url": nats_url,
        "nats_subject_prefix": "test-" + secrets.token_hex(4),
        **extra,
    }


@contextmanager
def replica_pair(
    tmp_path: Path,
    settings: dict[str, Any],
    *,
    own_urls: bool = False,
    b_settings: dict[str, Any] | None = None,
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two replicas sharing ``settings``: replica-a (started first: its data dir holds the
    first-start credentials) and replica-b, with ``b_settings`` on top. ``own_urls`` gives
    each its own URL as its LEGATOR_REPLICA_URL, unless ``b_settings`` names another."""
    a = LiveServer(tmp_path / "a", replica_id="replica-a", **settings)
    b = LiveServer(tmp_path / "b", replica_id="replica-b", **settings, **(b_settings or {}))
    if own_urls:
        for server in (a, b):
            server.settings_overrides.setdefault("replica_url", server.url)
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


class NatsServer:
    """A private ``nats-server`` on a free loopback port, for tests that stop and restart it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class FakeClock:
    """A clock a test moves by hand (``clock.now += 60``), for code that takes a
    ``clock: Callable[[], float]``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
