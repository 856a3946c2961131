"""Old commands and their output are deleted, finished ones only, on both databases."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from legator.core.db import Database, utcnow
from legator.core.db.migrate import upgrade
from legator.fleet.commands.service import prune_commands
from legator.fleet.models import Command, CommandChunk, Probe
from tests.support import eventually, first_started, live_server


def _command(probe_id: str, name: str, created: datetime, *, finished: bool) -> Command:
    return Command(
        id=name,
        probe_id=probe_id,
        command="uptime",
        level="observe",
        timeout_s=60.0,
        mode="wait",
        status="completed" if finished else "running",
        created_at=created,
        deadline_at=created + timedelta(seconds=60),
        finished_at=created + timedelta(seconds=1) if finished else None,
    )


async def _prune_old_commands(url: str) -> None:
    db = Database(url)
    try:
        await upgrade(db)
        now = utcnow()
        old, recent = now - timedelta(days=40), now - timedelta(days=2)
        async with db.write() as session:
            session.add(Probe(id="prb-1", hostname="h1", key_hash="k" * 64))
            await session.flush()
            rows = [_command("prb-1", f"old-{i}", old, finished=True) for i in range(7)]
            rows.append(_command("prb-1", "recent", recent, finished=True))
            # Old but unfinished: kept while its deadline lies ahead, deleted once it passed.
            waiting = _command("prb-1", "old-waiting", old, finished=False)
            waiting.deadline_at = now + timedelta(hours=1)
            rows.append(waiting)
            rows.append(_command("prb-1", "old-lost", old, finished=False))
            session.add_all(rows)
            await session.flush()
            session.add_all(
                CommandChunk(command_id=row.id, seq=seq, stream="stdout", data="x")
                for row in rows
                for seq in range(3)
            )
        cutoff = now - timedelta(days=30)
        assert await prune_commands(db, cutoff, batch=3) == 8  # 7 finished + the lost one
        assert await prune_commands(db, cutoff, batch=3) == 0
        async with db.session() as session:
            left = set((await session.execute(select(Command.id))).scalars())
            chunks = await session.scalar(select(func.count()).select_from(CommandChunk))
        assert left == {"recent", "old-waiting"}
        assert chunks == 2 * 3  # the deleted commands' output went with them
    finally:
        await db.dispose()


def test_old_finished_commands_and_their_output_are_deleted(db_url: str) -> None:
    asyncio.run(_prune_old_commands(db_url))


def _command_ids(url: str, rows: list[Command] | None = None) -> set[str]:
    """Adds ``rows`` (and their probe) to the database at ``url``; every command id there."""

    async def go() -> set[str]:
        db = Database(url)  # not migrated again: the server may be running on it
        try:
            if rows:
                async with db.write() as session:
                    session.add(Probe(id="prb-1", hostname="h1", key_hash="k" * 64))
                    await session.flush()
                    session.add_all(rows)
            async with db.session() as session:
                return set((await session.execute(select(Command.id))).scalars())
        finally:
            await db.dispose()

    return asyncio.run(go())


@pytest.mark.parametrize("retention_days", [30, 0])
def test_a_server_deletes_commands_past_their_retention_as_it_starts(
    tmp_path: Path, retention_days: int
) -> None:
    data = tmp_path / "data"
    url = first_started(data)
    now = utcnow()
    old = _command("prb-1", "old", now - timedelta(days=31), finished=True)
    recent = _command("prb-1", "recent", now - timedelta(days=29), finished=True)
    assert _command_ids(url, [old, recent]) == {"old", "recent"}
    with live_server(data, fleet_command_retention_days=retention_days):
        eventually(lambda: _command_ids(url), {"recent"} if retention_days else {"old", "recent"})
