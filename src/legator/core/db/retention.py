"""Deleting a growing table's old rows: oldest first, in small transactions, every hour.

Each batch is its own short transaction with a pause after it: other writers waiting on
SQLite's lock retry at up to 100 ms intervals, and a first run over a large backlog must not
keep them out (2,000 rows and 0.2 s held another writer's commits to 185 ms at worst, against
1.44 s with 5,000 rows and no pause: docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select

from legator.core.db.base import utcnow
from legator.core.db.engine import Database
from legator.core.logging import get_logger

log = get_logger("legator.core.retention")

PRUNE_BATCH = 2_000
PRUNE_PAUSE_S = 0.2
PRUNE_INTERVAL_S = 3600.0


async def prune(
    db: Database,
    key: Any,
    timestamp: Any,
    before: datetime,
    *,
    batch: int = PRUNE_BATCH,
    also: ColumnElement[bool] | None = None,
) -> int:
    """Delete the rows of ``key``'s table whose ``timestamp`` is before ``before`` (and that
    match ``also``), oldest first; returns how many went."""
    deleted = 0
    condition = timestamp < before if also is None else (timestamp < before) & also
    while True:
        # On PostgreSQL, replicas pruning at the same time take different rows instead of
        # waiting on (or deadlocking over) each other's; SQLite has one writer anyway.
        oldest = (
            select(key)
            .where(condition)
            .order_by(timestamp)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        async with db.write() as session:
            result = await session.execute(
                delete(key.table).where(key.in_(oldest.scalar_subquery()))
            )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        deleted += count
        if count < batch:
            return deleted
        await asyncio.sleep(PRUNE_PAUSE_S)


async def keep_for(
    what: str, days: int, prune_before: Callable[[datetime], Awaitable[int]]
) -> None:
    """Every hour, from now on, delete the ``what`` older than ``days`` days."""
    while True:
        try:
            count = await prune_before(utcnow() - timedelta(days=days))
        except Exception:
            log.exception("deleting old rows failed; retrying in an hour", what=what)
        else:
            if count:
                log.info("old rows deleted", what=what, rows=count, older_than_days=days)
        await asyncio.sleep(PRUNE_INTERVAL_S)
