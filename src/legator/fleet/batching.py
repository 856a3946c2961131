"""Group commit: many small writes share one transaction.

Writers queue a function of the session and await it. A single writer loop takes everything
queued so far and runs it in one ``db.write()``; while that commits, new work queues up for
the next round. One command alone pays one transaction; a fan-out to thousands pays a few.
Hand-written because SQLAlchemy has no group commit of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from legator.core.db import Database
from legator.core.logging import get_logger

log = get_logger("legator.fleet.batching")
T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[Any]]
MAX_BATCH = 500


class GroupCommitter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[tuple[Work, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="fleet-group-commit")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        results: list[Any] = []
        try:
            async with self.db.write() as session:
                for work, _ in batch:
                    results.append(await work(session))
        except Exception as exc:
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(exc)
                return
            # One bad item must not fail the others: run them one by one.
            for item in batch:
                await self._commit([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
