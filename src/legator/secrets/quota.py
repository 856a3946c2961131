"""Storage quotas: how much any one writer, and everyone together, may keep in the store.

setec keeps every version of every secret until someone deletes it, and so would legerd: any
caller allowed to ``put`` could fill the disk. A quota refuses the write that would exceed it
(nothing is ever pruned behind a caller's back: a client may hold any version).

What a version weighs is its row: the sealed value plus the name. A deleted version keeps its
row (its number stays claimed) without its value, so it goes on weighing its name until the
whole secret is deleted. A writer's secrets are those it created (put or created version 1 of).

Checking a quota must not cost a scan of the store: every check runs inside the one writer
transaction, so a scan would make every caller's write as slow as the biggest writer's rows.
The totals are counters in ``writer_usage``, kept by the store in the same transaction as the
rows they count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from legator.secrets.errors import InvalidRequest

ENV_PREFIX = "LEGERD_"

# SQL that both SQLite and PostgreSQL (through pgstore's translation) run. LENGTH of a
# BLOB/BYTEA is its size in bytes, and needs no decryption. Rows written before quotas, or
# imported, have no writer: they count under '' (no caller is named that), in the total only.
WEIGHT_BY_WRITER = (
    "SELECT writer, SUM(LENGTH(name) + COALESCE(LENGTH(sealed), 0)) FROM versions "
    "WHERE name = ? GROUP BY writer"
)
NO_WRITER = ""
_CREATE_USAGE = (
    "CREATE TABLE writer_usage (writer TEXT PRIMARY KEY, "
    "bytes BIGINT NOT NULL DEFAULT 0, secrets BIGINT NOT NULL DEFAULT 0)"
)
_FILL_BYTES = (
    "INSERT INTO writer_usage (writer, bytes) SELECT COALESCE(writer, ''), "
    "SUM(LENGTH(name) + COALESCE(LENGTH(sealed), 0)) FROM versions GROUP BY COALESCE(writer, '')"
)
_ADD_USAGE = (
    "INSERT INTO writer_usage (writer, bytes, secrets) VALUES (?, ?, ?) "
    "ON CONFLICT (writer) DO UPDATE SET bytes = writer_usage.bytes + excluded.bytes, "
    "secrets = writer_usage.secrets + excluded.secrets"
)


class QuotaExceeded(InvalidRequest):
    """A write that would take the store beyond a quota. setec's client reports the body of
    any status other than 403, 404 and 412 verbatim, so the caller reads why."""

    status_code = 400
    message = "quota exceeded"


@dataclass(frozen=True)
class Quota:
    """The limits; 0 means none."""

    max_versions_per_secret: int = 1000  # live versions of one secret
    max_secrets_per_writer: int = 10_000  # secrets the writer created, until deleted
    max_bytes_per_writer: int = 256 << 20  # the weight of the rows the writer put
    max_total_bytes: int = 2 << 30  # the weight of every row

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Quota:
        """``LEGERD_MAX_VERSIONS_PER_SECRET`` and so on; unset: the default. Raises
        ValueError naming the variable for anything but a non-negative integer."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            key = ENV_PREFIX + item.name.upper()
            if key in env:
                values[item.name] = parse_limit(key, env[key])
        return cls(**values)


def parse_limit(key: str, text: str) -> int:
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"{key}={text!r}: expected a non-negative integer (0: no limit)")
    return int(value)


@dataclass(frozen=True)
class Write:
    """A version about to be stored: who writes it, where, its row's weight, and whether it
    creates the secret."""

    writer: str | None  # None: no caller (an import, a tool on the store)
    name: str
    weight: int
    creates: bool


def create_usage(conn: Any) -> None:
    """Create ``writer_usage`` from the rows of a store that has none yet."""
    conn.execute(_CREATE_USAGE)
    conn.execute(_FILL_BYTES)
    created = conn.execute(
        "SELECT COALESCE(creator, ''), COUNT(*) FROM secrets GROUP BY COALESCE(creator, '')"
    ).fetchall()
    for creator, count in created:
        add_usage(conn, creator, secrets=int(count))


def add_usage(conn: Any, writer: str | None, *, weight: int = 0, secrets: int = 0) -> None:
    """Count (or, negative, uncount) rows' weight and created secrets for ``writer``."""
    conn.execute(_ADD_USAGE, (writer or NO_WRITER, weight, secrets))


def row_weight(name: str, sealed: bytes) -> int:
    return len(name.encode()) + len(sealed)


def enforce(conn: Any, quota: Quota, write: Write) -> None:
    """Refuse ``write`` if storing it would exceed a quota. Runs inside the writer-exclusive
    transaction that then stores it, so two writes cannot both take the last of a quota."""
    _versions_per_secret(conn, quota.max_versions_per_secret, write)
    _secrets_per_writer(conn, quota.max_secrets_per_writer, write)
    _bytes_per_writer(conn, quota.max_bytes_per_writer, write)
    _total_bytes(conn, quota.max_total_bytes, write)


def _usage(conn: Any, writer: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT bytes, secrets FROM writer_usage WHERE writer = ?", (writer,)
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _scalar(conn: Any, sql: str, params: tuple[Any, ...]) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def _versions_per_secret(conn: Any, limit: int, write: Write) -> None:
    if not limit:
        return
    kept = _scalar(
        conn,
        "SELECT COUNT(*) FROM versions WHERE name = ? AND sealed IS NOT NULL",
        (write.name,),
    )
    if kept + 1 > limit:
        raise QuotaExceeded(
            f"quota exceeded: {write.name!r} keeps {kept} versions, the most allowed; "
            "delete-version old ones first"
        )


def _secrets_per_writer(conn: Any, limit: int, write: Write) -> None:
    if not limit or not write.creates:
        return
    _, held = _usage(conn, write.writer or NO_WRITER)
    if held + 1 > limit:
        raise QuotaExceeded(
            f"quota exceeded: {write.writer} already created {held} secrets, the most one "
            f"writer may; {write.name!r} would be one more (delete some first)"
        )


def _bytes_per_writer(conn: Any, limit: int, write: Write) -> None:
    if not limit:
        return
    used, _ = _usage(conn, write.writer or NO_WRITER)
    if used + write.weight > limit:
        raise QuotaExceeded(
            f"quota exceeded: {write.writer} stores {used} bytes; {write.weight} more would "
            f"pass the {limit} bytes one writer may store (delete secrets or versions first)"
        )


def _total_bytes(conn: Any, limit: int, write: Write) -> None:
    if not limit:
        return
    used = _scalar(conn, "SELECT SUM(bytes) FROM writer_usage", ())
    if used + write.weight > limit:
        raise QuotaExceeded(
            f"quota exceeded: all secrets together take {used} bytes; {write.weight} more "
            f"would pass the {limit} bytes this server stores"
        )


@dataclass(frozen=True)
class UsageChange:
    """One writer's totals in ``writer_usage`` before and after a recount."""

    writer: str  # '' for the rows no caller wrote (before quotas, or imported)
    bytes_before: int
    bytes_after: int
    secrets_before: int
    secrets_after: int

    def as_json(self) -> dict[str, Any]:
        return {
            "writer": self.writer,
            "bytes": {"before": self.bytes_before, "after": self.bytes_after},
            "secrets": {"before": self.secrets_before, "after": self.secrets_after},
        }


_BYTES_BY_WRITER = (
    "SELECT COALESCE(writer, ''), SUM(LENGTH(name) + COALESCE(LENGTH(sealed), 0)) "
    "FROM versions GROUP BY COALESCE(writer, '')"
)
_SECRETS_BY_CREATOR = (
    "SELECT COALESCE(creator, ''), COUNT(*) FROM secrets GROUP BY COALESCE(creator, '')"
)
_SET_USAGE = (
    "INSERT INTO writer_usage (writer, bytes, secrets) VALUES (?, ?, ?) "
    "ON CONFLICT (writer) DO UPDATE SET bytes = excluded.bytes, secrets = excluded.secrets"
)


def recount_usage(conn: Any) -> list[UsageChange]:
    """Set ``writer_usage`` to what the rows add up to, and answer the totals that changed.
    Runs inside a writer-exclusive transaction: no write counts meanwhile. Counters drift when
    a writer that does not keep them (a replica from before quotas) writes beside one that
    does, or when rows are changed by hand."""
    counted: dict[str, tuple[int, int]] = {}
    for writer, weight in conn.execute(_BYTES_BY_WRITER).fetchall():
        counted[writer] = (int(weight or 0), 0)
    for creator, created in conn.execute(_SECRETS_BY_CREATOR).fetchall():
        counted[creator] = (counted.get(creator, (0, 0))[0], int(created))
    rows = conn.execute("SELECT writer, bytes, secrets FROM writer_usage").fetchall()
    stored = {writer: (int(used), int(held)) for writer, used, held in rows}
    changes = []
    for writer in sorted(counted.keys() | stored.keys()):
        before, after = stored.get(writer, (0, 0)), counted.get(writer, (0, 0))
        if before == after:
            continue
        changes.append(UsageChange(writer, before[0], after[0], before[1], after[1]))
        if after == (0, 0):
            conn.execute("DELETE FROM writer_usage WHERE writer = ?", (writer,))
        else:
            conn.execute(_SET_USAGE, (writer, *after))
    return changes
