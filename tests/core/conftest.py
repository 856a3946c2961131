"""Fixtures shared by the core's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from legator.core.db import Database
from legator.core.db.migrate import upgrade


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A SQLite database with every migration applied (a test module may define its own)."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/legator.db")
    await upgrade(database)
    yield database
    await database.dispose()
