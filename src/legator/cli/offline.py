"""Offline administration: open the data dir directly (for recovery and automation)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from legator.cli.common import err_console
from legator.core.audit.service import AuditService
from legator.core.auth.service import AuthService
from legator.core.config import ConfigError, Settings
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from legator.core.errors import BadRequest


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None for an in-memory database."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/"):  # sqlite:// (nothing after the authority): in memory
        return None
    path = rest[1:].split("?", 1)[0]
    if path in ("", ":memory:") or "mode=memory" in rest:
        return None
    return Path(path)


def offline_database_url(settings: Settings, *, create: bool = False) -> str:
    """The database an offline command works on, refusing (ConfigError: exit 2) one that
    cannot be what was meant: none configured, an in-memory one (nothing to administer, and a
    migration or a change there is lost at exit), or a data dir or SQLite file that does not
    exist (a typo would otherwise get a new, empty database and a success). With ``create``
    (first-time setup: ``db upgrade``, ``users create``) a missing data dir and database are
    created, and a line on stderr says so."""
    if settings.data_dir is None and settings.database_url is None:
        raise ConfigError(
            "LEGATOR_DATA_DIR: not set; give --data-dir, or set LEGATOR_DATA_DIR or "
            "LEGATOR_DATABASE_URL"
        )
    url = settings.effective_database_url
    if not url.startswith("sqlite"):
        return url  # PostgreSQL: its server says whether the database exists
    path = sqlite_file(url)
    if path is None:
        raise ConfigError(
            "LEGATOR_DATABASE_URL: an in-memory SQLite database, which lives only as long as "
            "this command; give --data-dir or a sqlite:/// file"
        )
    if path.is_file():
        return url
    from_data_dir = settings.database_url is None and settings.data_dir is not None
    if not create:
        if from_data_dir and not settings.data_dir.is_dir():  # type: ignore[union-attr]
            raise ConfigError(
                f"LEGATOR_DATA_DIR (--data-dir): {settings.data_dir} does not exist; "
                "check the path (nothing was created)"
            )
        raise ConfigError(
            f"no Legator database at {path}; check --data-dir, LEGATOR_DATA_DIR or "
            "LEGATOR_DATABASE_URL (nothing was created)"
        )
    if from_data_dir:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # type: ignore[union-attr]
    elif not path.parent.is_dir():
        raise ConfigError(f"LEGATOR_DATABASE_URL: {path.parent} does not exist")
    err_console.print(f"no database at {path}: creating a new one", highlight=False)
    return url


@asynccontextmanager
async def offline_auth(settings: Settings, *, create: bool = False) -> AsyncIterator[AuthService]:
    """The auth service over the configured database, migrated to head first. The database
    must exist unless ``create`` (see :func:`offline_database_url`)."""
    db = Database(offline_database_url(settings, create=create))
    try:
        await upgrade(db)
        chain_key = (
            settings.audit_chain_key.get_secret_value().encode()
            if settings.audit_chain_key
            else None
        )
        # The server's key may live only in its unit's environment: an event written without
        # it, or with another, would break the chain, so a write refuses instead (exit 2).
        yield AuthService(db, AuditService(db, chain_key, check_key=True))
    finally:
        await db.dispose()


def backup_database(settings: Settings, target: Path) -> int:
    """A consistent online copy; returns its size in bytes.

    The copy is created here, exclusively and 0600, before a byte is written into it: never
    an existing file or a link planted at the path, and at no moment readable by others (a
    copy made first and chmod-ed afterwards could be opened by anyone meanwhile, and an open
    file stays readable after the chmod)."""
    url = offline_database_url(settings)
    source_path = sqlite_file(url) if url.startswith("sqlite") else None
    if source_path is None and shutil.which("pg_dump") is None:
        raise BadRequest("pg_dump is not installed; it is needed to back up PostgreSQL")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise BadRequest(f"{target} already exists; choose a new path") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may only have taken bits away; make it exactly 0600
        if source_path is not None:
            _sqlite_backup(source_path, target)
        else:
            _pg_dump(url, fd)
        return os.fstat(fd).st_size
    except BaseException:
        # Remove the partial copy, but only the file this call created.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(target), os.fstat(fd)):
                os.unlink(target)
        raise
    finally:
        os.close(fd)


def _sqlite_backup(source_path: Path, target: Path) -> None:
    # SQLite's online backup API copies a consistent snapshot while the server writes; it
    # writes into the (empty, 0600) file created above, and its journal takes that mode too.
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    try:
        dest = sqlite3.connect(target)
        try:
            with dest:
                source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()


def _pg_dump(url: str, fd: int) -> None:
    parts = urlsplit(url.replace("postgresql+asyncpg", "postgresql", 1))
    env = {
        "PGHOST": parts.hostname or "localhost",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": parts.username or "",
        "PGPASSWORD": parts.password or "",  # through the environment, never argv
        "PGDATABASE": parts.path.lstrip("/"),
        "PATH": "/usr/bin:/bin:/usr/local/bin",
    }
    # The dump goes to standard output, that is into the file opened above.
    subprocess.run(["pg_dump", "--format=custom"], env=env, stdout=fd, check=True, timeout=3600)
