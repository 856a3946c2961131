"""The encrypted secrets database, one sealed row per version: SQLite (WAL, synchronous=FULL)
for legerd and a single control plane; ``pgstore.py`` holds the same tables in PostgreSQL for
replicas that share one database.

It knows versions and encryption, not callers: access control and auditing live in
``service.py``. Every mutation runs in one writer-exclusive transaction (``BEGIN IMMEDIATE``
here) and calls its ``before_commit`` hook (the durable audit record) inside it, so a change
is never visible without its audit entry, and a crash at any point leaves the previous
committed state.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from legator.secrets.crypto import Kek, Sealer, generate_key, unwrap_dek, wrap_dek
from legator.secrets.errors import (
    InvalidRequest,
    KekError,
    NotAStore,
    SecretNotFound,
    VersionClaimed,
)
from legator.secrets.quota import (
    WEIGHT_BY_WRITER,
    Quota,
    UsageChange,
    Write,
    add_usage,
    create_usage,
    enforce,
    recount_usage,
    row_weight,
)

Hook = Callable[[int], None] | None

# The highest version number: PostgreSQL's INTEGER (SQLite's holds more), so that both
# backends accept the same versions and a put always has a next number to take.
MAX_VERSION = (1 << 31) - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_keys (
    kek_id TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    latest INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES secrets(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    sealed BLOB,  -- NULL: deleted; the version stays claimed and is never reused
    PRIMARY KEY (name, version)
);
"""
# Who put each version and who created each secret, for the per-writer quotas (NULL: before
# quotas, or imported). Added apart from _SCHEMA: CREATE TABLE IF NOT EXISTS leaves an older
# store's tables as they are.
_QUOTA_COLUMNS = (("versions", "writer"), ("secrets", "creator"))


@dataclass(frozen=True)
class SecretInfo:
    name: str
    versions: list[int] = field(default_factory=list)
    active_version: int = 0


@dataclass(frozen=True)
class SourceSecret:
    """One secret of a store being imported, its values opened (``None``: a deleted version,
    still claimed). Never logged or audited: its repr leaves the values out."""

    name: str
    active: int
    latest: int
    values: dict[int, bytes | None] = field(repr=False)

    @property
    def live(self) -> dict[int, bytes]:
        """The versions not deleted, with their values."""
        return {version: value for version, value in self.values.items() if value is not None}

    @property
    def versions(self) -> list[int]:
        return list(self.live)

    @property
    def deleted(self) -> list[int]:
        return [version for version, value in self.values.items() if value is None]


ImportHook = Callable[[SourceSecret], None] | None


@dataclass
class ImportReport:
    """What ``import_from`` did with each of the source's secrets, by name."""

    imported: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # here already, the same versions
    conflicts: list[str] = field(default_factory=list)  # here already, different: left alone

    def left_alone(self, name: str, *, same: bool) -> None:
        (self.unchanged if same else self.conflicts).append(name)


class SqlStore(ABC):
    """The store's logic, written once in SQLite's SQL; the PostgreSQL backend's connections
    translate the two things that differ (``?`` placeholders, ``CAST(… AS BLOB)``)."""

    _sealer: Sealer

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """A writer-exclusive transaction; yields an object with ``execute(sql, params)``."""

    @abstractmethod
    def _reader(self) -> Any:
        """A connection for reads (its ``execute`` answers a cursor)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections."""

    @abstractmethod
    def _columns(self, conn: Any, table: str) -> set[str]:
        """The column names of ``table``."""

    @abstractmethod
    def _tables(self, conn: Any) -> set[str]:
        """The names of the store's tables."""

    def _add_quota_accounting(self, conn: Any) -> None:
        """Bring a store from before quotas up to date, inside a writer transaction."""
        for table, column in _QUOTA_COLUMNS:
            if column not in self._columns(conn, table):
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        if "writer_usage" not in self._tables(conn):
            create_usage(conn)

    # keys

    def _load_or_create_dek(self, kek: Kek) -> bytes:
        with self._transaction() as conn:
            rows = conn.execute("SELECT kek_id, wrapped FROM data_keys").fetchall()
            if not rows:
                refuse_if_values_are_sealed(conn)
                dek = generate_key()
                conn.execute(
                    "INSERT INTO data_keys (kek_id, wrapped) VALUES (?, ?)",
                    (kek.key_id, wrap_dek(kek, dek)),
                )
                return dek
        for kek_id, wrapped in rows:
            if kek_id == kek.key_id:
                return unwrap_dek(kek, wrapped)
        raise KekError(
            f"the key-encryption key from {kek.source} (id {kek.key_id}) is not the one this "
            f"store was sealed with (id {', '.join(r[0] for r in rows)})"
        )

    def add_kek(self, new: Kek, dek_from: Kek) -> None:
        """Wrap the data key under ``new`` as well (first step of a rotation)."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT wrapped FROM data_keys WHERE kek_id = ?", (dek_from.key_id,)
            ).fetchone()
            if row is None:
                raise KekError(f"no data key is wrapped under the key from {dek_from.source}")
            dek = unwrap_dek(dek_from, row[0])
            conn.execute(
                "INSERT INTO data_keys (kek_id, wrapped) VALUES (?, ?) "
                "ON CONFLICT (kek_id) DO UPDATE SET wrapped = excluded.wrapped",
                (new.key_id, wrap_dek(new, dek)),
            )

    def drop_other_keks(self, keep: Kek) -> None:
        """Drop every wrapping of the data key but ``keep``'s (last step of a rotation)."""
        with self._transaction() as conn:
            kept = conn.execute(
                "SELECT 1 FROM data_keys WHERE kek_id = ?", (keep.key_id,)
            ).fetchone()
            if kept is None:
                raise KekError(
                    f"the data key is not wrapped under the key from {keep.source} "
                    f"(id {keep.key_id}): dropping the other wrappings would leave none"
                )
            conn.execute("DELETE FROM data_keys WHERE kek_id != ?", (keep.key_id,))

    # reads

    def list(self) -> list[SecretInfo]:
        conn = self._reader()
        rows = conn.execute(
            "SELECT s.name, s.active, v.version FROM secrets s JOIN versions v "
            "ON v.name = s.name AND v.sealed IS NOT NULL ORDER BY s.name, v.version"
        ).fetchall()
        result: dict[str, SecretInfo] = {}
        for name, active, version in rows:
            info = result.setdefault(name, SecretInfo(name, [], active))
            info.versions.append(version)
        # Byte order, as setec lists: PostgreSQL's ORDER BY follows the database's collation.
        return sorted(result.values(), key=lambda info: info.name)

    def info(self, name: str) -> SecretInfo:
        conn = self._reader()
        row = conn.execute("SELECT active FROM secrets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SecretNotFound()
        versions = [
            v
            for (v,) in conn.execute(
                "SELECT version FROM versions WHERE name = ? AND sealed IS NOT NULL "
                "ORDER BY version",
                (name,),
            )
        ]
        return SecretInfo(name, versions, row[0])

    def active_version(self, name: str) -> int:
        conn = self._reader()
        row = conn.execute("SELECT active FROM secrets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SecretNotFound()
        return int(row[0])

    def get(self, name: str, version: int = 0) -> tuple[bytes, int]:
        """The value of ``version`` (0: the active one) and its version number."""
        conn = self._reader()
        if version == 0:
            row = conn.execute(
                "SELECT v.version, CAST(v.sealed AS BLOB) FROM secrets s JOIN versions v "
                "ON v.name = s.name AND v.version = s.active WHERE s.name = ?",
                (name,),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT version, CAST(sealed AS BLOB) FROM versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
        if row is None or row[1] is None:
            raise SecretNotFound()
        return self._sealer.open(name, row[0], row[1]), int(row[0])

    # writes

    def put(
        self,
        name: str,
        value: bytes,
        before_commit: Hook = None,
        *,
        writer: str | None = None,
        quota: Quota | None = None,
    ) -> int:
        """Store ``value`` as the next version (the first is active), unless it equals the
        latest; ``quota`` is enforced on ``writer`` in the same transaction."""
        with self._transaction() as conn:
            row = conn.execute("SELECT latest FROM secrets WHERE name = ?", (name,)).fetchone()
            creates = row is None
            if row is None:
                version = 1
                conn.execute(
                    "INSERT INTO secrets (name, active, latest, creator) VALUES (?, 1, 1, ?)",
                    (name, writer),
                )
            else:
                latest = int(row[0])
                current = conn.execute(
                    "SELECT CAST(sealed AS BLOB) FROM versions WHERE name = ? AND version = ?",
                    (name, latest),
                ).fetchone()
                unchanged = current is not None and current[0] is not None
                if unchanged and self._sealer.open(name, latest, current[0]) == value:
                    # No new version, yet audited as every put is (setec logs each call).
                    if before_commit:
                        before_commit(latest)
                    return latest
                if latest >= MAX_VERSION:
                    raise InvalidRequest(
                        f"bad request: {name!r} has reached the highest version, {MAX_VERSION}; "
                        "delete the secret to number its versions from 1 again"
                    )
                version = latest + 1
                conn.execute("UPDATE secrets SET latest = ? WHERE name = ?", (version, name))
            self._insert_version(conn, Write(writer, name, 0, creates), version, value, quota)
            if before_commit:
                before_commit(version)
            return version

    def _insert_version(
        self, conn: Any, write: Write, version: int, value: bytes, quota: Quota | None
    ) -> None:
        """Seal and store one version, within ``quota`` (none: unlimited), and count it."""
        sealed = self._sealer.seal(write.name, version, value)
        write = replace(write, weight=row_weight(write.name, sealed))
        if quota is not None:
            enforce(conn, quota, write)
        conn.execute(
            "INSERT INTO versions (name, version, sealed, writer) VALUES (?, ?, ?, ?)",
            (write.name, version, sealed, write.writer or None),
        )
        add_usage(conn, write.writer, weight=write.weight, secrets=int(write.creates))

    def create_version(
        self,
        name: str,
        version: int,
        value: bytes,
        before_commit: Hook = None,
        *,
        writer: str | None = None,
        quota: Quota | None = None,
    ) -> None:
        if version <= 0:
            raise InvalidRequest("invalid version, please specify a version > 0")
        with self._transaction() as conn:
            row = conn.execute("SELECT latest FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO secrets (name, active, latest, creator) VALUES (?, ?, ?, ?)",
                    (name, version, version, writer),
                )
            else:
                claimed = conn.execute(
                    "SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, version)
                ).fetchone()
                if claimed:
                    raise VersionClaimed()
                conn.execute(
                    "UPDATE secrets SET active = ?, "
                    "latest = CASE WHEN latest > ? THEN latest ELSE ? END WHERE name = ?",
                    (version, version, version, name),
                )
            write = Write(writer, name, 0, creates=row is None)
            self._insert_version(conn, write, version, value, quota)
            if before_commit:
                before_commit(version)

    def activate(self, name: str, version: int, before_commit: Hook = None) -> None:
        with self._transaction() as conn:
            row = conn.execute("SELECT active FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise SecretNotFound()
            if int(row[0]) == version:
                # Nothing to change, yet audited as every activate is (setec logs each call).
                if before_commit:
                    before_commit(version)
                return
            live = conn.execute(
                "SELECT 1 FROM versions WHERE name = ? AND version = ? AND sealed IS NOT NULL",
                (name, version),
            ).fetchone()
            if not live:
                raise SecretNotFound()
            conn.execute("UPDATE secrets SET active = ? WHERE name = ?", (version, name))
            if before_commit:
                before_commit(version)

    def delete(self, name: str, before_commit: Hook = None) -> None:
        """Delete every version; a secret that does not exist is a no-op, as in setec (its
        ``kv.deleteSecret``), still audited."""
        with self._transaction() as conn:
            weights = conn.execute(WEIGHT_BY_WRITER, (name,)).fetchall()
            for writer, weight in weights:
                add_usage(conn, writer, weight=-int(weight))
            created = conn.execute("SELECT creator FROM secrets WHERE name = ?", (name,))
            for (creator,) in created.fetchall():
                add_usage(conn, creator, secrets=-1)
            conn.execute("DELETE FROM versions WHERE name = ?", (name,))
            conn.execute("DELETE FROM secrets WHERE name = ?", (name,))
            if before_commit:
                before_commit(0)

    def delete_version(self, name: str, version: int, before_commit: Hook = None) -> None:
        if version <= 0:
            raise InvalidRequest("invalid version, please specify a version > 0")
        with self._transaction() as conn:
            row = conn.execute("SELECT active FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise SecretNotFound()
            if int(row[0]) == version:
                raise InvalidRequest("cannot delete the active version")
            live = conn.execute(
                "SELECT writer, LENGTH(sealed) FROM versions WHERE name = ? AND version = ? "
                "AND sealed IS NOT NULL",
                (name, version),
            ).fetchone()
            if live is None:
                raise SecretNotFound()
            conn.execute(
                "UPDATE versions SET sealed = NULL WHERE name = ? AND version = ?", (name, version)
            )
            add_usage(conn, live[0], weight=-int(live[1]))
            if before_commit:
                before_commit(version)

    def exported(self) -> Iterator[SourceSecret]:
        """Every secret, its values opened, in name order: what ``import_secret`` copies."""
        heads = self._reader().execute("SELECT name, active, latest FROM secrets ORDER BY name")
        for name, active, latest in heads.fetchall():
            rows = self._reader().execute(
                "SELECT version, CAST(sealed AS BLOB) FROM versions WHERE name = ? "
                "ORDER BY version",
                (name,),
            )
            values = {
                int(version): None if sealed is None else self._sealer.open(name, version, sealed)
                for version, sealed in rows.fetchall()
            }
            yield SourceSecret(name, int(active), int(latest), values)

    def versions_above(self, limit: int) -> list[tuple[str, int]]:
        """Each secret numbered beyond ``limit`` (a version, deleted or not, or its active or
        latest number), with its highest number, in name order."""
        conn = self._reader()
        highest: dict[str, int] = {}
        rows = [
            *conn.execute("SELECT name, version FROM versions WHERE version > ?", (limit,)),
            *conn.execute(
                "SELECT name, active FROM secrets WHERE active > ? "
                "UNION ALL SELECT name, latest FROM secrets WHERE latest > ?",
                (limit, limit),
            ),
        ]
        for name, number in rows:
            highest[name] = max(int(number), highest.get(name, 0))
        return sorted(highest.items())

    def sealed_versions(self, secret: SourceSecret) -> list[tuple[int, bytes | None]]:
        """``secret``'s versions sealed under this store's data key (``None``: deleted)."""
        return [
            (version, None if value is None else self._sealer.seal(secret.name, version, value))
            for version, value in secret.values.items()
        ]

    def import_secret(self, secret: SourceSecret, before_commit: ImportHook = None) -> bool:
        """Copy in one secret as it is elsewhere, in one transaction with ``before_commit``
        (its audit record) called inside it; ``False`` when this store has the name already
        (then nothing is written and the hook is not called)."""
        with self._transaction() as conn:
            here = conn.execute("SELECT 1 FROM secrets WHERE name = ?", (secret.name,)).fetchone()
            if here is not None:
                return False
            conn.execute(
                "INSERT INTO secrets (name, active, latest) VALUES (?, ?, ?)",
                (secret.name, secret.active, secret.latest),
            )
            weight = 0
            for version, sealed in self.sealed_versions(secret):
                conn.execute(
                    "INSERT INTO versions (name, version, sealed) VALUES (?, ?, ?)",
                    (secret.name, version, sealed),
                )
                weight += row_weight(secret.name, sealed or b"")
            add_usage(conn, None, weight=weight, secrets=1)
            if before_commit:
                before_commit(secret)
            return True

    def holds(self, secret: SourceSecret) -> bool:
        """Whether this store has ``secret`` with the same live values and active version."""
        return (
            self._live_values(secret.name) == secret.live
            and self.active_version(secret.name) == secret.active
        )

    def import_from(self, source: SqlStore, before_commit: ImportHook = None) -> ImportReport:
        """Copy in every secret of ``source`` that this store lacks, as it is there: version
        numbers, deleted versions (still claimed, never reused), the active version. Values are
        opened with the source's data key and sealed with this store's. A name this store has
        already is left alone. One transaction per secret, ``before_commit`` called inside
        each: an interrupted import leaves every secret copied with its record or not at all,
        and is run again.
        """
        report = ImportReport()
        for secret in source.exported():
            if self.import_secret(secret, before_commit):
                report.imported.append(secret.name)
            else:
                report.left_alone(secret.name, same=self.holds(secret))
        return report

    def _live_values(self, name: str) -> dict[int, bytes]:
        rows = self._reader().execute(
            "SELECT version, CAST(sealed AS BLOB) FROM versions WHERE name = ? "
            "AND sealed IS NOT NULL",
            (name,),
        )
        return {int(v): self._sealer.open(name, v, sealed) for v, sealed in rows.fetchall()}

    def verify_all(self) -> int:
        """Open every stored value; raises StoreCorrupted on the first that fails. Returns the
        number of values checked."""
        count = 0
        for name, version, sealed in self._reader().execute(
            "SELECT name, version, CAST(sealed AS BLOB) FROM versions WHERE sealed IS NOT NULL"
        ):
            self._sealer.open(name, version, sealed)
            count += 1
        return count


def refuse_if_values_are_sealed(conn: Any) -> None:
    """A store without a data key gets a new one only while it holds no value: one with values
    has lost its data key, and a new one would open none of them."""
    (sealed,) = conn.execute("SELECT COUNT(*) FROM versions WHERE sealed IS NOT NULL").fetchone()
    if sealed:
        raise KekError(
            f"the store holds {sealed} sealed value(s) but no data key to open them; "
            "restore the data_keys table from a backup"
        )


NO_USAGE_TABLE = (
    "has no writer_usage table yet (a store from before quotas): the next `legerd serve` or "
    "control plane to open it counts the totals from the rows"
)


def recount_sqlite_usage(path: Path) -> list[UsageChange]:
    """``recount_usage`` on the SQLite store at ``path`` in one writer transaction (a legerd
    serving it meanwhile waits, as for any other writer). Needs no key: values are counted,
    never opened."""
    if not path.is_file():
        raise NotAStore(f"no secrets store at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "writer_usage" not in tables:
                raise NotAStore(f"{path} {NO_USAGE_TABLE}")
            changes = recount_usage(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return changes
    finally:
        conn.close()


def make_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite creates its -wal and
    -shm files with the database file's mode), and bring an existing store's files to 0600."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            file.chmod(0o600)


class SecretStore(SqlStore):
    """SQLite: one file, one writer connection, one reader connection per thread."""

    def __init__(self, path: Path, kek: Kek) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        make_private(path)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        with self._transaction() as conn:
            self._add_quota_accounting(conn)
        self._sealer = Sealer(self._load_or_create_dek(kek))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before put() returns, so an acknowledged put survives
        # kill -9 and power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self) -> None:
        self._writer.close()

    def _columns(self, conn: Any, table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}

    def _tables(self, conn: Any) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
