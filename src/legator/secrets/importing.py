"""Copying a SQLite secrets store (one from before the move to PostgreSQL, or another
replica's) into the store the control plane uses: ``legator secrets import-sqlite``.

Each secret copied is one ``secrets.import`` event in the control plane's audit log (its name,
versions and source; never a value), written with it: on PostgreSQL in the same transaction
as its rows, so an interrupted import leaves each secret in with its event or neither; with
SQLite (the audit log and the store are two files) inside the store's transaction, committed
just before it, as for every other change of a secret. A finished import adds one
``secrets.import.summary`` event: what was imported, unchanged and in conflict.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio.from_thread
import anyio.to_thread

from legator.core.audit.service import AuditService
from legator.core.config import ConfigError, Settings
from legator.secrets.crypto import load_key_file
from legator.secrets.errors import SecretsError
from legator.secrets.location import open_store, sqlite_dir
from legator.secrets.pgstore import PgSecretStore
from legator.secrets.store import (
    MAX_VERSION,
    ImportReport,
    SecretStore,
    SourceSecret,
    SqlStore,
)

IMPORT_ACTION = "secrets.import"
SUMMARY_ACTION = "secrets.import.summary"


class SourceUnreadable(SecretsError):
    message = "not a readable SQLite secrets store"


class VersionsOutOfRange(SecretsError):
    """The source numbers versions beyond what the target holds (SQLite's INTEGER holds more
    than PostgreSQL's); raised before anything is copied."""


def refuse_versions_out_of_range(source: SecretStore, source_path: Path) -> None:
    too_high = source.versions_above(MAX_VERSION)
    if not too_high:
        return
    named = ", ".join(f"{name!r} version {version}" for name, version in too_high[:5])
    more = f" and {len(too_high) - 5} more secret(s)" if len(too_high) > 5 else ""
    raise VersionsOutOfRange(
        f"{source_path}: {named}{more} above {MAX_VERSION}, the highest version a store here "
        "holds; nothing was imported. Save those secrets' values, delete them from the "
        "source store, import again, then put them here anew"
    )


def import_event(secret: SourceSecret, source: Path, actor: str) -> dict[str, Any]:
    """The audit fields of one imported secret: what it holds, never a value."""
    return {
        "actor": actor,
        "action": IMPORT_ACTION,
        "target": secret.name,
        "details": {
            "source": str(source),
            "versions": secret.versions,
            "deleted_versions": secret.deleted,
            "active_version": secret.active,
        },
    }


@dataclass
class SqliteImport:
    """A SQLite store opened for import into the control plane's store (``open_sqlite_import``);
    ``run`` copies it, ``close`` closes both."""

    source_path: Path
    source: SecretStore
    target: SqlStore

    async def run(self, audit: AuditService, *, actor: str = "cli") -> ImportReport:
        """What became of each secret, audited in ``audit``: the control plane's log, on the
        database the target store's settings name. Raises ``SecretsError`` for a value that
        cannot be opened or a version beyond ``MAX_VERSION`` (then before copying anything),
        ``psycopg.Error`` or SQLAlchemy's errors for the database."""
        refuse_versions_out_of_range(self.source, self.source_path)
        if isinstance(self.target, PgSecretStore):
            report = await _import_in_one_database(self, self.target, audit, actor)
        else:
            report = await _import_beside_the_log(self, audit, actor)
        await audit.log(
            actor=actor,
            action=SUMMARY_ACTION,
            target=str(self.source_path),
            details={
                "imported": report.imported,
                "unchanged": report.unchanged,
                "conflicts": report.conflicts,
            },
        )
        return report

    def close(self) -> None:
        self.source.close()
        self.target.close()


def open_sqlite_import(
    settings: Settings, directory: Path | None, key_file: Path | None
) -> SqliteImport:
    """Open the SQLite store in ``directory`` (default: the one ``settings`` used before) with
    ``key_file`` (default: its own), and the control plane's store. Raises ``ConfigError``
    for what the operator must point elsewhere, ``SecretsError`` for a store that cannot be
    read (a wrong key included), ``psycopg.Error`` for PostgreSQL."""
    directory = directory or sqlite_dir(settings)
    if directory is None:
        raise ConfigError("give the SQLite store's directory (no LEGATOR_DATA_DIR to default to)")
    source_path = directory / "secrets.db"
    if not source_path.is_file():
        raise ConfigError(f"no SQLite secrets store at {source_path}")
    key_file = key_file or directory / "keys" / "main.key"
    if not key_file.is_file():
        raise ConfigError(f"no key file at {key_file}: give the store's KEK with --key-file")
    try:
        kek = load_key_file(key_file, create=False)
    except SecretsError as exc:
        raise ConfigError(exc.message) from None
    target, scratch = open_store(settings)
    try:
        here = target.path.resolve() if isinstance(target, SecretStore) else None
        if scratch is not None or here == source_path.resolve():
            raise ConfigError(
                "the control plane's own store is that file (or lives in memory): point "
                "LEGATOR_DATABASE_URL or LEGATOR_SECRETS_DIR at the store to import into"
            )
        try:
            source = SecretStore(source_path, kek)
        except sqlite3.Error as exc:
            raise SourceUnreadable(f"{source_path}: {SourceUnreadable.message} ({exc})") from None
    except BaseException:
        target.close()
        raise
    return SqliteImport(source_path, source, target)


async def _import_in_one_database(
    job: SqliteImport, target: PgSecretStore, audit: AuditService, actor: str
) -> ImportReport:
    """PostgreSQL: the secrets' schema and the audit log share the database, so each secret's
    rows and its event are one transaction."""
    report = ImportReport()
    for secret in job.source.exported():
        async with audit.db.write() as session:
            imported = await target.import_secret_in(session, secret)
            if imported:
                await audit.record(session, **import_event(secret, job.source_path, actor))
        if imported:
            report.imported.append(secret.name)
        else:
            report.left_alone(secret.name, same=target.holds(secret))
    return report


async def _import_beside_the_log(
    job: SqliteImport, audit: AuditService, actor: str
) -> ImportReport:
    """SQLite: the store and the audit log are two files. Each secret's event is committed
    inside its transaction, before the secret is: a secret is never in without its event."""

    def record(secret: SourceSecret) -> None:
        anyio.from_thread.run(partial(audit.log, **import_event(secret, job.source_path, actor)))

    return await anyio.to_thread.run_sync(partial(job.target.import_from, job.source, record))
