"""The database handle: engine, read sessions and write transactions.

SQLite runs in WAL mode with a busy timeout and foreign keys on. Write transactions start
with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing when a read
transaction tries to upgrade. An in-memory database has exactly one connection, so its
sessions take turns behind a lock.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from legator.core.db import sqlite_driver

SQLITE_BUSY_TIMEOUT_MS = 10_000
_WRITE_OPTION = "legator_write"


def _configure_sqlite(engine: AsyncEngine, *, in_memory: bool) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control so that BEGIN can be IMMEDIATE for writers.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _keep_private(database: Path) -> None:
    """The database holds password hashes, command payloads and the audit log: for its owner
    only, whatever the umask or the mode of an existing directory. SQLite gives the -wal and
    -shm files the main file's mode; existing ones are set too."""
    if not database.parent.is_dir():
        return  # SQLite will say so
    os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        if path.exists():
            path.chmod(0o600)


class Database:
    """One per process. ``session()`` for reads, ``write()`` for a transaction that commits."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        scheme, _, rest = url.partition("://")
        if scheme in ("postgres", "postgresql"):
            # asyncpg, as the settings choose: SQLAlchemy's default for a bare URL is psycopg,
            # whose errors and types differ.
            url = f"postgresql+asyncpg://{rest}"
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.in_memory = self.is_sqlite and url.rstrip("/") in ("sqlite+aiosqlite:", "sqlite:")
        # An error's message must not carry the statement's values (command env, payloads):
        # it reaches the process log.
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
        if self.is_sqlite:
            kwargs["module"] = sqlite_driver.dbapi()
        if self.in_memory:
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif self.is_sqlite:
            kwargs.update(pool_size=8, max_overflow=8)
            _keep_private(Path(make_url(url).database or ""))
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, in_memory=self.in_memory)
            # An executemany INSERT as multi-row statements: sqlite3 releases and retakes the
            # GIL around every row it steps, and on the driver's thread each of those could be
            # a handoff with the busy event loop (the usage writer's thread: 22 → 12 µs of CPU
            # per row under load, docs/performance.md).
            self.engine.dialect.use_insertmanyvalues_wo_returning = True
        write_engine = self.engine.execution_options(**{_WRITE_OPTION: True})
        self._read_factory = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_factory = async_sessionmaker(write_engine, expire_on_commit=False)
        # The single in-memory connection cannot hold two transactions at once.
        self._memory_lock = asyncio.Lock() if self.in_memory else None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; anything it writes is rolled back unless committed."""
        async with self._turn(), self._read_factory() as session:
            yield session

    @asynccontextmanager
    async def write(self, *, turns: str | None = None) -> AsyncIterator[AsyncSession]:
        """A write transaction: commits on success, rolls back on any exception.

        Transactions given the same ``turns`` name run one at a time across all replicas,
        for checks a row lock cannot cover (no overlap with rows another writer may be adding).
        PostgreSQL takes an advisory lock until the transaction ends; SQLite's ``BEGIN
        IMMEDIATE`` already lets one writer in at a time."""
        async with self._turn(), self._write_factory() as session, session.begin():
            if turns is not None and not self.is_sqlite:
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": turns}
                )
            yield session

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._memory_lock is None:
            yield
            return
        async with self._memory_lock:
            yield

    async def ping(self) -> bool:
        try:
            async with self.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()
