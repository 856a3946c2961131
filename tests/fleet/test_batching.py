"""Group commit: concurrent writes share transactions, and one failure spoils no other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from legator.core.db import Database
from legator.core.db.migrate import upgrade
from legator.fleet.batching import GroupCommitter
from legator.fleet.models import Policy


async def test_batches_and_isolates_failures(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    await upgrade(db)
    writer = GroupCommitter(db)

    def add(name: str):  # type: ignore[no-untyped-def]
        async def work(session):  # type: ignore[no-untyped-def]
            session.add(Policy(id=name, name=name, level="observe", allow=[], block=[], paths=[]))
            await session.flush()
            return name

        return work

    names = [f"p{i}" for i in range(200)]
    results = await asyncio.gather(
        *(writer.run(add(n)) for n in names), writer.run(add("p5")), return_exceptions=True
    )
    assert results[:200] == names
    assert isinstance(results[200], Exception)  # the duplicate alone fails
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Policy)) == 200
    with pytest.raises(Exception):  # noqa: B017 - any integrity error will do
        await writer.run(add("p1"))
    await writer.close()
    await db.dispose()
