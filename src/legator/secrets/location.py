"""Where the control plane keeps its secrets store, and which key opens it: in PostgreSQL,
shared by every replica, under ``LEGATOR_SECRETS_KEK``; otherwise a SQLite file in
``LEGATOR_SECRETS_DIR`` or ``<data dir>/secrets`` under that key or the directory's key file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from legator.core.config import ConfigError, Settings
from legator.core.logging import get_logger
from legator.secrets.crypto import Kek, load_key_file, parse_key
from legator.secrets.pgstore import PgSecretStore
from legator.secrets.store import SecretStore, SqlStore

log = get_logger("legator.secrets")


def settings_kek(settings: Settings) -> Kek | None:
    if settings.secrets_kek is None:
        return None
    raw = settings.secrets_kek.get_secret_value()
    return Kek(parse_key(raw, "LEGATOR_SECRETS_KEK"), "LEGATOR_SECRETS_KEK")


def sqlite_dir(settings: Settings) -> Path | None:
    """The directory of the SQLite store: the store itself, or on PostgreSQL the one that
    was used before the move."""
    return settings.secrets_dir or (settings.data_dir / "secrets" if settings.data_dir else None)


def warn_of_sqlite_store_left_behind(settings: Settings) -> None:
    legacy = sqlite_dir(settings)
    if not settings.is_sqlite and legacy is not None and (legacy / "secrets.db").exists():
        # Not copied behind the operator's back: each replica's file had its own contents and
        # maybe its own KEK; the import command says what it copied and what clashed.
        log.warning(
            "secrets store: the store is in PostgreSQL; the SQLite store from before is not "
            "used: `legator secrets import-sqlite` copies its secrets in",
            path=str(legacy / "secrets.db"),
        )


def open_store(settings: Settings) -> tuple[SqlStore, Path | None]:
    """The store, and the throwaway directory it lives in when the control plane runs in
    memory (to remove at shutdown)."""
    kek = settings_kek(settings)
    if not settings.is_sqlite:
        if kek is None:
            # A key file per replica would give each its own KEK, and all but the first
            # replica could not open the shared data key.
            raise ConfigError(
                "LEGATOR_SECRETS_KEK: required with a PostgreSQL LEGATOR_DATABASE_URL "
                "(the same key on every replica)"
            )
        return PgSecretStore(settings.effective_database_url, kek), None
    scratch = None
    directory = sqlite_dir(settings)
    if directory is None:
        if settings.database_url:
            # Persistent state elsewhere but nowhere for secrets: a throwaway store would lose
            # them at the next restart.
            raise ConfigError(
                "LEGATOR_SECRETS_DIR: the secrets store needs a directory when "
                "LEGATOR_DATABASE_URL is set and LEGATOR_DATA_DIR is not"
            )
        directory = scratch = Path(tempfile.mkdtemp(prefix="legator-secrets-"))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if kek is None:
        kek = load_key_file(directory / "keys" / "main.key")
    return SecretStore(directory / "secrets.db", kek), scratch
