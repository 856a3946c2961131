"""Copying a SQLite secrets store (one from before the move to PostgreSQL, or another
replica's) into the store the control plane uses: ``legator secrets import-sqlite``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from legator.core.config import ConfigError, Settings
from legator.secrets.crypto import load_key_file
from legator.secrets.errors import SecretsError
from legator.secrets.location import open_store, sqlite_dir
from legator.secrets.store import ImportReport, SecretStore


class SourceUnreadable(SecretsError):
    message = "not a readable SQLite secrets store"


def import_sqlite_store(
    settings: Settings, directory: Path | None, key_file: Path | None
) -> tuple[Path, ImportReport]:
    """The source file and what became of each of its secrets. Raises ``ConfigError`` for
    what the operator must point elsewhere, ``SecretsError`` for a store that cannot be read
    (a wrong key included), ``psycopg.Error`` for PostgreSQL."""
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
        try:
            return source_path, target.import_from(source)
        finally:
            source.close()
    finally:
        target.close()
