"""Offline administration: open the data dir directly (for recovery and automation)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from legator.core.audit.service import AuditService
from legator.core.auth.service import AuthService
from legator.core.config import Settings
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from legator.core.errors import BadRequest


@asynccontextmanager
async def offline_auth(settings: Settings) -> AsyncIterator[AuthService]:
    """The auth service over the configured database, migrated to head first."""
    if settings.data_dir is None and settings.database_url is None:
        raise BadRequest("set LEGATOR_DATA_DIR (or --data-dir) or LEGATOR_DATABASE_URL")
    if settings.data_dir is not None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.effective_database_url)
    try:
        await upgrade(db)
        chain_key = (
            settings.audit_chain_key.get_secret_value().encode()
            if settings.audit_chain_key
            else None
        )
        yield AuthService(db, AuditService(db, chain_key))
    finally:
        await db.dispose()


def backup_database(settings: Settings, target: Path) -> int:
    """A consistent online copy; returns its size in bytes."""
    if target.exists():
        raise BadRequest(f"{target} already exists; choose a new path")
    target.parent.mkdir(parents=True, exist_ok=True)
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        if settings.data_dir is None and settings.database_url is None:
            raise BadRequest("an in-memory database cannot be backed up; set LEGATOR_DATA_DIR")
        source_path = url.split(":///", 1)[1]
        if not Path(source_path).exists():
            raise BadRequest(f"no database at {source_path}")
        # SQLite's online backup API copies a consistent snapshot while the server writes.
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
        dest = sqlite3.connect(target)
        try:
            with dest:
                source.backup(dest)
        finally:
            source.close()
            dest.close()
        target.chmod(0o600)
        return target.stat().st_size
    if shutil.which("pg_dump") is None:
        raise BadRequest("pg_dump is not installed; it is needed to back up PostgreSQL")
    parts = urlsplit(url.replace("postgresql+asyncpg", "postgresql", 1))
    env = {
        "PGHOST": parts.hostname or "localhost",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": parts.username or "",
        "PGPASSWORD": parts.password or "",  # through the environment, never argv
        "PGDATABASE": parts.path.lstrip("/"),
        "PATH": "/usr/bin:/bin:/usr/local/bin",
    }
    subprocess.run(
        ["pg_dump", "--format=custom", "--file", str(target)], env=env, check=True, timeout=3600
    )
    target.chmod(0o600)
    return target.stat().st_size
