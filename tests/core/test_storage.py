"""Storage on SQLite (file and in-memory) and on the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from legator.core.auth.schemas import UserCreate
from legator.core.config import load_settings
from legator.core.db import Database, new_sorted_id
from legator.core.db.base import Base
from legator.core.db.migrate import current_revision, head_revision, import_all_models, upgrade
from tests.support import live_server, run_cli


async def _pragmas(url: str) -> tuple[str, int, int]:
    db = Database(url)
    try:
        async with db.session() as session:
            mode = (await session.execute(text("PRAGMA journal_mode"))).scalar_one()
            fk = (await session.execute(text("PRAGMA foreign_keys"))).scalar_one()
            busy = (await session.execute(text("PRAGMA busy_timeout"))).scalar_one()
        return mode, fk, busy
    finally:
        await db.dispose()


def test_sorted_ids_are_uuid7_in_time_order() -> None:
    before = time.time_ns() // 1_000_000
    first = new_sorted_id()
    time.sleep(0.002)
    ids = [first, *(new_sorted_id() for _ in range(1000))]
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(before <= u.int >> 80 <= after for u in parsed)
    assert ids[0] < min(ids[1:])  # a later millisecond sorts after, as text too
    assert len(set(ids)) == len(ids)
    assert len({u.int & ((1 << 62) - 1) for u in parsed}) == len(ids)  # random bits vary


def test_sqlite_runs_wal_with_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    mode, fk, busy = asyncio.run(_pragmas(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    assert (mode, fk) == ("wal", 1) and busy >= 5000


def test_concurrent_writers_do_not_fail(tmp_path: Path) -> None:
    async def go() -> int:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
        await upgrade(db)
        from legator.core.audit.service import AuditService

        audit = AuditService(db, b"k")
        await asyncio.gather(*(audit.log(actor="t", action=f"a{i}") for i in range(200)))
        report = await audit.verify()
        await db.dispose()
        return report.checked

    assert asyncio.run(go()) == 200


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_failed_statement_does_not_carry_its_values(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Errors reach the process log: a command's env in a payload must not ride along."""
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )

    async def fail() -> str:
        db = Database(url)
        try:
            async with db.write() as session:
                insert = text("INSERT INTO t_secret (v) VALUES (:v)")
                await session.execute(insert, {"v": '{"env": {"STRIPE": "rk_live_hunter2"}}'})
        except Exception as exc:  # no such table
            return str(exc)
        finally:
            await db.dispose()
        return ""

    message = asyncio.run(fail())
    assert "INSERT INTO t_secret" in message and "hunter2" not in message


def test_the_sqlite_files_are_for_their_owner_only(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # an existing directory others may enter
    old = tmp_path / "old.db"
    old.touch(mode=0o644)

    async def use(path: Path) -> None:
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            async with db.write() as session:
                await session.execute(text("CREATE TABLE t (v TEXT)"))
            files = [p for p in tmp_path.iterdir() if p.name.startswith(path.name)]
            assert {p.name for p in files} >= {path.name, f"{path.name}-wal", f"{path.name}-shm"}
            assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
        finally:
            await db.dispose()

    previous = os.umask(0o022)
    try:
        asyncio.run(use(tmp_path / "new.db"))
        asyncio.run(use(old))
    finally:
        os.umask(previous)


def test_in_memory_mode_serves(tmp_path: Path) -> None:
    with live_server(None) as server, server.client(server.admin_key) as api:
        assert api.post("/api/v1/keys", json={"name": "m"}).status_code == 201
        assert len(api.get("/api/v1/audit").json()["events"]) == 2


def test_migrations_apply_and_report_head(tmp_path: Path) -> None:
    result = run_cli("legator", "db", "upgrade", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert head_revision() in result.stdout
    again = run_cli("legator", "db", "current", "--data-dir", str(tmp_path))
    assert f"current: {head_revision()}" in again.stdout


async def _schema_drift(url: str) -> list[object]:
    """What the models declare that the migrations at head do not (or the other way)."""
    import_all_models()
    db = Database(url)
    try:
        await upgrade(db)
        async with db.session() as session:
            connection = await session.connection()
            return await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await db.dispose()


def test_migrations_build_the_schema_the_models_declare(tmp_path: Path) -> None:
    url = load_settings(data_dir=tmp_path).effective_database_url
    assert asyncio.run(_schema_drift(url)) == []


@pytest.mark.postgres
def test_postgresql_migrations_build_the_schema_the_models_declare(pg_url: str) -> None:
    url = load_settings(database_url=pg_url).effective_database_url
    assert asyncio.run(_schema_drift(url)) == []


def test_backup_is_a_consistent_copy_while_writing(tmp_path: Path) -> None:
    with live_server(tmp_path / "d") as server, server.client(server.admin_key) as api:
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                api.post("/api/v1/keys", json={"name": "load"})

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            result = run_cli(
                "legator", "backup", str(tmp_path / "copy.db"), "--data-dir", str(tmp_path / "d")
            )
        finally:
            stop.set()
            thread.join()
        assert result.returncode == 0, result.stderr
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("SELECT username FROM users").fetchall() == [("admin",)]
    assert (tmp_path / "copy.db").stat().st_mode & 0o777 == 0o600
    refused = run_cli(
        "legator", "backup", str(tmp_path / "copy.db"), "--data-dir", str(tmp_path / "d")
    )
    assert refused.returncode != 0 and "already exists" in refused.stderr


@pytest.mark.postgres
def test_postgresql_migrations_identity_and_chain(pg_url: str, tmp_path: Path) -> None:
    settings = load_settings(database_url=pg_url)

    async def check_revision() -> str | None:
        db = Database(settings.effective_database_url)
        try:
            await upgrade(db)
            return await current_revision(db)
        finally:
            await db.dispose()

    assert asyncio.run(check_revision()) == head_revision()
    with (
        live_server(
            tmp_path / "d",
            database_url=pg_url,
            audit_chain_key="pg-chain-key-0123456789",
            secrets_kek="ab" * 32,
        ) as server,
        server.client(server.admin_key) as api,
    ):
        assert api.get("/api/v1/me").json()["username"] == "admin"
        for i in range(5):
            assert api.post("/api/v1/keys", json={"name": f"pg{i}"}).status_code == 201
        assert api.get("/api/v1/audit/verify").json()["ok"] is True
        assert httpx.get(server.url + "/readyz").status_code == 200
    backup = run_cli(
        "legator", "backup", str(tmp_path / "pg.dump"), env={"LEGATOR_DATABASE_URL": pg_url}
    )
    assert backup.returncode == 0, backup.stderr
    assert (tmp_path / "pg.dump").read_bytes()[:5] == b"PGDMP"


def test_user_create_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 12"):
        UserCreate(username="ok", password="short")
