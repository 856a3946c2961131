"""File operations on a few threads of their own.

A file operation can hold its thread for long: a read on a slow or hung file system, a scan
of a huge file, a search that waits on its child. On the event loop's default pool, shared
with heartbeats, inventory, updates and name resolution, a handful of them stopped the probe
heartbeating. Here at most ``FILE_WORKERS`` run at once and ``FILE_QUEUE`` more wait, each at
most ``QUEUE_WAIT_S``; beyond that a request is refused at once, with a reason."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

FILE_WORKERS = 4
FILE_QUEUE = 16
# The control plane waits 30 s for an answer: one that could only start later is refused.
QUEUE_WAIT_S = 10.0

T = TypeVar("T")


class Busy(Exception):
    """The probe refused a file operation because too many are under way or waiting."""


class FilePool:
    def __init__(
        self,
        workers: int = FILE_WORKERS,
        queue: int = FILE_QUEUE,
        wait_s: float = QUEUE_WAIT_S,
    ) -> None:
        self.workers, self.queue, self.wait_s = workers, queue, wait_s
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="legator-file")
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` on one of the pool's threads, once one is free."""
        await self._take_slot()
        job = asyncio.get_running_loop().run_in_executor(self._threads, func, *args)
        # The slot is the thread's: it is freed when the work ends, even if whoever waited
        # for it was cancelled meanwhile (a thread cannot be stopped).
        job.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(job)

    async def _take_slot(self) -> None:
        if self._slots.locked() and self._waiting >= self.queue:
            raise Busy(
                f"the probe is busy: {self.workers} file operations under way and "
                f"{self._waiting} waiting, the most it takes; try again later"
            )
        self._waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise Busy(
                f"the probe is busy: no file worker free after {self.wait_s:g}s "
                f"({self.workers} file operations under way); try again later"
            ) from None
        finally:
            self._waiting -= 1
