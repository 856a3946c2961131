"""Sign-in counts and known addresses live in the database: a restart keeps them, replicas on
one database share them, old rows go, and no submitted name or address is stored."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select

from legator.core.audit.service import AuditService
from legator.core.auth.attempts import SignInThrottle
from legator.core.auth.models import SignInCount
from legator.core.auth.service import AuthService
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from tests.support import FakeClock, LiveServer, live_server, replica_pair

PASSWORD = "correct horse battery"
KEY = bytes(range(32))


def _throttle(db: Database, clock: FakeClock) -> SignInThrottle:
    return SignInThrottle(
        db,
        KEY,
        per_account=3,
        per_address=100,
        window_s=60,
        per_username=5,
        username_window_s=600,
        known_for_s=3600,
        clock=clock,
    )


async def _rows(db: Database) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(SignInCount)) or 0)


def _sign_in(server: LiveServer, address: str, password: str, user: str = "alice") -> int:
    with server.client() as anon:
        return anon.post(
            "/api/v1/auth/login",
            json={"username": user, "password": password},
            headers={"X-Forwarded-For": address},  # the test server trusts loopback proxies
        ).status_code


def _add_alice(server: LiveServer) -> None:
    with server.client(server.admin_key) as api:
        body = {"username": "alice", "password": PASSWORD, "role": "viewer"}
        assert api.post("/api/v1/users", json=body).status_code == 201


def _keys() -> dict[str, str]:
    return {"signing_key": secrets.token_hex(32), "secrets_kek": secrets.token_hex(32)}


def test_a_restart_keeps_the_limits_and_the_known_addresses(db_url: str, tmp_path: Path) -> None:
    settings = {} if db_url.startswith("sqlite") else _keys()
    with live_server(tmp_path / "data", database_url=db_url, **settings) as server:
        _add_alice(server)
        assert _sign_in(server, "192.0.2.10", PASSWORD) == 200  # the owner, from home
        guesses = [_sign_in(server, f"198.51.100.{i + 1}", "wrong guess") for i in range(30)]
        assert guesses == [401] * 30
        server.restart()
        # The 31st guess, after the restart: the guesser's budget did not start afresh.
        assert _sign_in(server, "198.51.100.200", "wrong guess") == 429
        assert _sign_in(server, "203.0.113.5", PASSWORD) == 429  # a new address waits
        assert _sign_in(server, "192.0.2.10", PASSWORD) == 200  # the known one still gets in


@pytest.mark.postgres
def test_replicas_on_one_database_share_the_counts_without_a_bus(
    pg_url: str, tmp_path: Path
) -> None:
    """No NATS: only the database joins the two, and a count is there at once."""
    settings = {"database_url": pg_url, **_keys()}
    with replica_pair(tmp_path, settings) as (a, b):
        statuses = [_sign_in(a, "192.0.2.7", "wrong", user="admin") for _ in range(6)]
        statuses += [_sign_in(b, "192.0.2.7", "wrong", user="admin") for _ in range(5)]
        assert statuses == [401] * 10 + [429], statuses
        assert _sign_in(a, "192.0.2.7", "wrong", user="admin") == 429


async def test_rows_older_than_their_window_are_pruned(db: Database) -> None:
    clock = FakeClock(1_800_000_000.0)
    throttle = _throttle(db, clock)
    assert await throttle.admit("192.0.2.10", "alice")
    await throttle.succeeded("192.0.2.10", "alice")  # leaves one row: the known address
    for i in range(4):
        assert await throttle.admit(f"198.51.100.{i}", "alice")  # 3 rows each
    assert await _rows(db) == 1 + 4 * 3
    clock.now += 61  # the per-address and per-account windows are over
    assert await throttle.prune() == 8
    clock.now += 540  # and the per-username one
    assert await throttle.prune() == 4
    assert await _rows(db) == 1
    clock.now += 3000  # the known address's 3,600 s
    assert await throttle.prune() == 1
    assert await _rows(db) == 0


async def test_the_housekeeping_loop_deletes_rows_past_their_window(db: Database) -> None:
    auth = AuthService(db, AuditService(db, None), signing_key=KEY)
    assert await auth._sign_ins.admit("192.0.2.1", "bob")  # counted now: its 3 rows stay
    past = datetime.now(UTC) - timedelta(seconds=1)
    stale = [{"key": f"{i:032x}", "expires_at": past} for i in range(50)]
    async with db.write() as session:
        await session.execute(insert(SignInCount), stale)
    assert await _rows(db) == 53
    housekeeping = asyncio.create_task(auth.run_housekeeping(interval=0.05))
    try:
        deadline = time.monotonic() + 30
        while (rows := await _rows(db)) != 3:
            assert time.monotonic() < deadline, f"{rows} rows left"
            await asyncio.sleep(0.05)
    finally:
        housekeeping.cancel()


async def test_no_submitted_name_or_address_is_stored(db: Database, tmp_path: Path) -> None:
    throttle = _throttle(db, FakeClock(1_800_000_000.0))
    name = "hunter2-typed-in-the-name-field"
    assert await throttle.admit("192.0.2.77", name)
    await throttle.succeeded("192.0.2.77", name)
    assert await throttle.admit("198.51.100.77", name)
    with sqlite3.connect(tmp_path / "legator.db") as raw:
        rows = raw.execute("SELECT * FROM sign_in_counts").fetchall()
    assert rows, "nothing was stored"
    stored = repr(rows)
    for secret in (name, "hunter2", "192.0.2.77", "198.51.100.77", "192.0.2", "198.51.100"):
        assert secret not in stored


async def test_a_different_key_counts_apart(db: Database) -> None:
    """The names are keyed hashes: a copy of the database alone cannot test guesses at them,
    and replicas must share the signing key to share counts."""
    clock = FakeClock(1_800_000_000.0)
    ours, theirs = (
        _throttle(db, clock),
        SignInThrottle(db, b"\x01" * 32, per_account=3, per_address=100, window_s=60, clock=clock),
    )
    for _ in range(3):
        assert await ours.admit("192.0.2.1", "alice")
    assert not await ours.admit("192.0.2.1", "alice")
    assert await theirs.admit("192.0.2.1", "alice")


async def test_every_statement_of_an_attempt_uses_an_index(db: Database, tmp_path: Path) -> None:
    """The sign-in path stays fast however many rows an attack leaves: no statement of an
    attempt or a success scans the table (SQLite's own query plans say)."""
    throttle = _throttle(db, FakeClock(1_800_000_000.0))
    statements: list[tuple[str, Any]] = []

    def seen(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "sign_in_counts" in statement:
            statements.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    assert await throttle.admit("192.0.2.1", "alice")
    await throttle.succeeded("192.0.2.1", "alice")
    event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    assert len(statements) == 6  # count (read); count, insert; count, delete, insert
    with sqlite3.connect(tmp_path / "legator.db") as raw:
        for statement, parameters in statements:
            if statement.startswith("INSERT"):
                continue
            plan = raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
            steps = [row[3] for row in plan]
            assert not any(step.startswith("SCAN") for step in steps), (statement, steps)
            assert any("ix_sign_in_counts_key_expires" in step for step in steps), steps


def test_a_restart_keeps_the_per_address_limit(server: LiveServer) -> None:
    """The per-address limit too survives: 100 attempts from one address, over all names."""
    statuses = [_sign_in(server, "192.0.2.99", "x", user=f"u{i}") for i in range(100)]
    assert statuses == [401] * 100
    server.restart()
    with server.client() as anon:
        refused = anon.post(
            "/api/v1/auth/login",
            json={"username": "someone", "password": "x"},
            headers={"X-Forwarded-For": "192.0.2.99"},
        )
    assert refused.status_code == 429, refused.text
    assert "for this address" in refused.json()["error"]["message"]


async def test_concurrent_guesses_cannot_pass_the_limit_together(db_url: str) -> None:
    """On either database, the check and the count are one step: of 20 guesses sent at once
    through two handles on one database (two replicas), exactly the limit get through."""
    first, second = Database(db_url), Database(db_url)
    try:
        await upgrade(first)
        clock = FakeClock(1_800_000_000.0)
        throttles = [_throttle(first, clock), _throttle(second, clock)]
        guesses = [throttles[i % 2].admit(f"198.51.100.{i}", "alice") for i in range(20)]
        admitted = await asyncio.gather(*guesses)
        assert sum(admitted) == 5  # per_username
        guesses = [throttles[i % 2].admit("192.0.2.1", f"name{i}") for i in range(20)]
        assert sum(await asyncio.gather(*guesses)) == 20  # other names: the address's 100
        guesses = [throttles[i % 2].admit("192.0.2.2", "bob") for i in range(20)]
        assert sum(await asyncio.gather(*guesses)) == 3  # per_account
    finally:
        await first.dispose()
        await second.dispose()


async def test_an_attempt_already_refused_does_not_wait_for_the_writer(db: Database) -> None:
    """A flood of refused guesses must not queue for SQLite's one writer: past a limit, an
    attempt is answered from a read alone."""
    throttle = _throttle(db, FakeClock(1_800_000_000.0))
    for _ in range(3):
        assert await throttle.admit("192.0.2.1", "alice")
    writes: list[str] = []

    def seen(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.upper().split()
        if words[0] in ("INSERT", "DELETE", "UPDATE") or words[:2] == ["BEGIN", "IMMEDIATE"]:
            writes.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    assert not await throttle.admit("192.0.2.1", "alice")
    event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    assert writes == []
