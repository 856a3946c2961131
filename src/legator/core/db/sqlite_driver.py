"""aiosqlite with one thread hop per statement.

aiosqlite runs each sqlite3 call on the connection's own thread, and SQLAlchemy's adapter
makes four such calls per query (open a cursor, execute, fetch, close). Each hop costs a
thread wake-up and an event-loop wake-up (about 70 µs on a small VM), which made a
one-row read session cost about 0.6 ms. This cursor executes, fetches and closes in a single
hop, a ``BEGIN`` travels with the statement that follows it, and a rollback with no
transaction open costs nothing (SQLAlchemy rolls back on session close and again when the
pool takes the connection back). Connections and the worker thread are aiosqlite's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi

_Outcome = tuple[Any, int, int | None, list[Any]]


def _execute(
    conn: sqlite3.Connection, begin: str | None, sql: str, parameters: Sequence[Any]
) -> _Outcome:
    if begin is not None:
        conn.execute(begin)
    cursor = conn.execute(sql, parameters)
    try:
        rows = cursor.fetchall() if cursor.description else []
        return cursor.description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def _executemany(
    conn: sqlite3.Connection,
    begin: str | None,
    sql: str,
    seq_of_parameters: Iterable[Sequence[Any]],
) -> _Outcome:
    if begin is not None:
        conn.execute(begin)
    cursor = conn.executemany(sql, seq_of_parameters)
    try:
        return cursor.description, cursor.rowcount, cursor.lastrowid, []
    finally:
        cursor.close()


class Cursor:
    """The subset of aiosqlite's cursor that SQLAlchemy uses, results held in memory."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[Any] = []

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def _take(self, outcome: _Outcome) -> Cursor:
        self.description, self.rowcount, self.lastrowid, self._rows = outcome
        return self

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        connection = self._connection
        if sql.startswith("BEGIN") and not parameters:
            connection.pending_begin = sql
            return self._take((None, -1, None, []))
        begin, connection.pending_begin = connection.pending_begin, None
        outcome = await connection._execute(_execute, connection._conn, begin, sql, parameters)
        return self._take(outcome)

    async def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]]) -> Cursor:
        connection = self._connection
        begin, connection.pending_begin = connection.pending_begin, None
        outcome = await connection._execute(
            _executemany, connection._conn, begin, sql, seq_of_parameters
        )
        return self._take(outcome)

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = size or self.arraysize
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        self._rows = []


class Connection(aiosqlite.Connection):
    pending_begin: str | None = None

    def cursor(self) -> Cursor:  # type: ignore[override]
        return Cursor(self)

    async def commit(self) -> None:
        if self.pending_begin is not None:  # an empty transaction: nothing to commit
            self.pending_begin = None
            return
        await super().commit()

    async def rollback(self) -> None:
        self.pending_begin = None
        if self._connection is not None and not self._conn.in_transaction:
            return
        await super().rollback()


def connect(database: str, **kwargs: Any) -> Connection:
    return Connection(lambda: sqlite3.connect(database, **kwargs), 64)


_ERRORS = (
    "DatabaseError",
    "Error",
    "IntegrityError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "sqlite_version",
    "sqlite_version_info",
)


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DBAPI module for ``create_async_engine(..., module=dbapi())``."""
    module = SimpleNamespace(
        connect=connect,
        Connection=Connection,
        **{name: getattr(aiosqlite, name) for name in _ERRORS},
    )
    return AsyncAdapt_aiosqlite_dbapi(module, sqlite3)  # type: ignore[arg-type]
