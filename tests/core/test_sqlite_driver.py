"""The SQLite driver: one thread hop per statement, with aiosqlite's transaction semantics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from legator.core.db import Database, sqlite_driver

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(50), unique=True, nullable=False),
)


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every trip to a connection's worker thread, named by what it ran."""
    seen: list[str] = []
    original: Callable[..., Any] = sqlite_driver.Connection._execute

    async def counting(self: sqlite_driver.Connection, fn: Any, *args: Any, **kw: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kw)

    monkeypatch.setattr(sqlite_driver.Connection, "_execute", counting)
    return seen


async def test_rows_keys_and_rowcounts(db: Database) -> None:
    async with db.write() as session:
        result = await session.execute(insert(items).values(name="a"))
        assert result.inserted_primary_key == (1,)
        many = await session.execute(insert(items), [{"name": "b"}, {"name": "c"}])
        assert many.rowcount == 2
    async with db.session() as session:
        names = (await session.execute(select(items.c.name).order_by(items.c.id))).scalars()
        assert list(names) == ["a", "b", "c"]
        assert (await session.execute(select(items).where(items.c.name == "z"))).first() is None
        updated = await session.execute(text("UPDATE items SET name = name || '!'"))
        assert updated.rowcount == 3
    async with db.session() as session:  # a read session rolls back what it wrote
        assert await session.scalar(select(items.c.name).where(items.c.id == 1)) == "a"


async def test_one_hop_per_statement(db: Database, hops: list[str]) -> None:
    async with db.session() as session:
        await session.execute(select(items))
    assert hops == ["_execute", "rollback"]  # BEGIN travels with the SELECT
    hops.clear()
    async with db.write() as session:
        await session.execute(insert(items).values(name="a"))
        await session.execute(insert(items).values(name="b"))
    assert hops == ["_execute", "_execute", "commit"]
    hops.clear()
    async with db.write():  # nothing executed: nothing to begin, commit or roll back
        pass
    assert hops == []


async def test_a_failed_write_leaves_nothing(db: Database) -> None:
    async with db.write() as session:
        await session.execute(insert(items).values(name="taken"))
    with pytest.raises(IntegrityError):
        async with db.write() as session:
            await session.execute(insert(items).values(name="new"))
            await session.execute(insert(items).values(name="taken"))
    async with db.session() as session:
        assert list((await session.execute(select(items.c.name))).scalars()) == ["taken"]
    async with db.write() as session:  # the connection is usable afterwards
        await session.execute(insert(items).values(name="after"))


async def test_writers_take_the_lock_in_turn(db: Database) -> None:
    """BEGIN IMMEDIATE still locks before the first statement runs: two concurrent write
    transactions of read-modify-write never lose an update."""

    async def increment() -> None:
        async with db.write() as session:
            count = await session.scalar(select(items.c.id).where(items.c.name == "counter"))
            await asyncio.sleep(0.01)  # hold the transaction open across a suspension
            await session.execute(
                text("UPDATE items SET id = :n WHERE name = 'counter'"), {"n": (count or 0) + 1}
            )

    async with db.write() as session:
        await session.execute(insert(items).values(id=0, name="counter"))
    await asyncio.gather(*(increment() for _ in range(5)))
    async with db.session() as session:
        assert await session.scalar(select(items.c.id).where(items.c.name == "counter")) == 5


async def test_a_busy_database_reports_locked(tmp_path: Path, db: Database) -> None:
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    try:
        async with db.write() as session:
            await session.execute(insert(items).values(name="held"))
            async with other.engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA busy_timeout=50")
                with pytest.raises(OperationalError, match="locked"):
                    await conn.execute(insert(items).values(name="blocked"))
                    await conn.commit()
    finally:
        await other.dispose()
