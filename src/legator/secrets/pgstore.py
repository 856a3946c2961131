"""The secrets store in PostgreSQL, for control-plane replicas that share one database.

Same tables, rows and logic as the SQLite store (``store.SqlStore``), in their own schema
``legator_secrets``. The store creates them itself, as the SQLite store does, because it opens
(and checks the KEK against the stored data key) while the app is built, before the lifespan
runs the Alembic migrations; and a schema of its own keeps them out of Alembic's
autogenerate, which compares only the default schema.

It runs on psycopg (synchronous): the service calls the store from worker threads and the
audit hook hops back to the event loop inside the transaction, which the async engine would
deadlock on. Writers, in every replica, are serialised by a transaction-scoped advisory lock:
the equivalent of SQLite's ``BEGIN IMMEDIATE``, so version numbers and the data key are
decided by one writer at a time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from legator.secrets.crypto import Kek, Sealer
from legator.secrets.errors import NotAStore
from legator.secrets.quota import UsageChange, recount_usage, row_weight
from legator.secrets.store import NO_USAGE_TABLE, SourceSecret, SqlStore

SCHEMA = "legator_secrets"
_LOCK_ID = 0x6C6567736563  # "legsec": the advisory lock every writer takes
_CAST = re.compile(r"CAST\(([\w.]+) AS BLOB\)")

_IMPORT_LOCK = text("SELECT pg_advisory_xact_lock(:lock)")
# On the control plane's connections (its search_path), hence the schema spelt out.
_IMPORT_HERE = text("SELECT 1 FROM legator_secrets.secrets WHERE name = :name")
_IMPORT_SECRET = text(
    "INSERT INTO legator_secrets.secrets (name, active, latest) VALUES (:name, :active, :latest)"
)
# An imported secret counts for no writer (see quota.py), in the total.
_IMPORT_USAGE = text(
    "INSERT INTO legator_secrets.writer_usage AS u (writer, bytes, secrets) "
    "VALUES ('', :weight, 1) ON CONFLICT (writer) DO UPDATE "
    "SET bytes = u.bytes + excluded.bytes, secrets = u.secrets + excluded.secrets"
)
_IMPORT_VERSION = text(
    "INSERT INTO legator_secrets.versions (name, version, sealed) VALUES (:name, :version, :sealed)"
)

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.data_keys (
    kek_id TEXT PRIMARY KEY,
    wrapped BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.secrets (
    name TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    latest INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.versions (
    name TEXT NOT NULL REFERENCES {SCHEMA}.secrets(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    sealed BYTEA,
    PRIMARY KEY (name, version)
);
"""


def libpq_url(database_url: str) -> str:
    """The control plane's SQLAlchemy URL (``postgresql+asyncpg://…``) as a libpq URL; asyncpg's
    ``ssl=`` takes libpq's name, ``sslmode=`` (the modes have the same names)."""
    url = make_url(database_url).set(drivername="postgresql")
    query = dict(url.query)
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
    return url.set(query=query).render_as_string(hide_password=False)


def translate_sql(sql: str) -> str:
    return _CAST.sub(r"\1", sql).replace("?", "%s")


class _Conn:
    """A psycopg connection speaking the SQL of ``SqlStore`` (SQLite's placeholders)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(translate_sql(sql), params)  # type: ignore[arg-type]


def _schema_tables(conn: Any) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (SCHEMA,)
    )
    return {row[0] for row in rows.fetchall()}


def recount_pg_usage(url: str) -> list[UsageChange]:
    """``recount_usage`` on the store in the PostgreSQL database at ``url`` (the control
    plane's), in one transaction under the writers' advisory lock: the replicas' writes wait
    for it and none is counted twice or missed. Needs no key."""
    with (
        psycopg.connect(
            libpq_url(url), autocommit=True, options=f"-c search_path={SCHEMA}", connect_timeout=10
        ) as raw,
        raw.transaction(),
    ):
        raw.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn = _Conn(raw)
        tables = _schema_tables(conn)
        if not tables:
            raise NotAStore(f"no secrets store (schema {SCHEMA}) in that database")
        if "writer_usage" not in tables:
            raise NotAStore(f"the store in schema {SCHEMA} {NO_USAGE_TABLE}")
        return recount_usage(conn)


class PgSecretStore(SqlStore):
    """One writer connection behind a lock and one shared autocommit reader (psycopg
    serialises its operations); both reconnect after the server restarts."""

    def __init__(self, url: str, kek: Kek) -> None:
        self.url = libpq_url(url)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer_conn: psycopg.Connection[Any] | None = None
        self._reader_conn: psycopg.Connection[Any] | None = None
        with self._transaction() as conn:
            # CREATE … IF NOT EXISTS races between replicas starting together: the lock
            # makes it one at a time.
            for statement in filter(None, (s.strip() for s in _DDL.split(";"))):
                conn.execute(statement)
            self._add_quota_accounting(conn)
        self._sealer = Sealer(self._load_or_create_dek(kek))

    def _connect(self) -> psycopg.Connection[Any]:
        # Autocommit: reads need no transaction, and writes open theirs explicitly.
        return psycopg.connect(
            self.url,
            autocommit=True,
            options=f"-c search_path={SCHEMA}",
            connect_timeout=10,
        )

    def _reader(self) -> _Conn:
        with self._read_lock:
            conn = self._reader_conn
            if conn is None or conn.closed or conn.broken:
                conn = self._reader_conn = self._connect()
        return _Conn(conn)

    def close(self) -> None:
        for conn in (self._writer_conn, self._reader_conn):
            if conn is not None:
                conn.close()

    def _columns(self, conn: Any, table: str) -> set[str]:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name = ?",
            (SCHEMA, table),
        )
        return {row[0] for row in rows.fetchall()}

    def _tables(self, conn: Any) -> set[str]:
        return _schema_tables(conn)

    async def import_secret_in(self, session: AsyncSession, secret: SourceSecret) -> bool:
        """``import_secret`` inside the caller's transaction on the control plane's database
        (the same database: the caller's audit record commits with the rows, or neither
        does). Takes the writers' advisory lock, as ``_transaction`` does."""
        await session.execute(_IMPORT_LOCK, {"lock": _LOCK_ID})
        if await session.scalar(_IMPORT_HERE, {"name": secret.name}) is not None:
            return False
        params = {"name": secret.name, "active": secret.active, "latest": secret.latest}
        await session.execute(_IMPORT_SECRET, params)
        rows = [
            {"name": secret.name, "version": version, "sealed": sealed}
            for version, sealed in self.sealed_versions(secret)
        ]
        if rows:
            await session.execute(_IMPORT_VERSION, rows)
        weight = sum(row_weight(secret.name, row["sealed"] or b"") for row in rows)
        await session.execute(_IMPORT_USAGE, {"weight": weight})
        return True

    @contextmanager
    def _transaction(self) -> Iterator[_Conn]:
        with self._write_lock:
            conn = self._writer_conn
            if conn is None or conn.closed or conn.broken:
                conn = self._writer_conn = self._connect()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
                yield _Conn(conn)
