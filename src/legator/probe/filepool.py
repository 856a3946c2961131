"""File operations on a few threads of their own.

A file operation can hold its thread for long: a read on a slow or hung file system, a scan
of a huge file, a search that waits on its child. On the event loop's default pool, shared
with heartbeats, inventory, updates and name resolution, a handful of them stopped the probe
heartbeating. Here at most ``FILE_WORKERS`` run at once and ``FILE_QUEUE`` more wait, each at
most ``QUEUE_WAIT_S``; beyond that a request is refused at once, with a reason.

A read on a hung file system (a dead NFS server, a stuck FUSE daemon) blocks its thread in
the kernel, where nothing can stop it. Such an operation is answered at ``DEADLINE_S`` and
its slot goes to the next one, its thread left to finish when it can; up to ``MAX_STUCK``
threads are left so, then the stuck ones hold their slots as any other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

FILE_WORKERS = 4
FILE_QUEUE = 16
# The control plane waits 30 s for an answer: one that could only start later is refused.
QUEUE_WAIT_S = 10.0
# Past the operations' own limits (a search's 20 s, a readlines scan's 10 s), so that this
# answers only one that cannot end: blocked in the kernel.
DEADLINE_S = 25.0
MAX_STUCK = 16

T = TypeVar("T")


class Busy(Exception):
    """The probe refused a file operation because too many are under way or waiting."""


class Stuck(TimeoutError):
    """A file operation ran past its deadline (a hung file system): answered, not awaited."""


class FilePool:
    def __init__(
        self,
        workers: int = FILE_WORKERS,
        queue: int = FILE_QUEUE,
        wait_s: float = QUEUE_WAIT_S,
        deadline_s: float = DEADLINE_S,
        max_stuck: int = MAX_STUCK,
    ) -> None:
        self.workers, self.queue, self.wait_s = workers, queue, wait_s
        self.deadline_s, self.max_stuck = deadline_s, max_stuck
        # A thread for each slot, and one for each operation left stuck past its deadline.
        self._threads = ThreadPoolExecutor(workers + max_stuck, thread_name_prefix="legator-file")
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0
        self.stuck = 0  # operations answered at their deadline and still running

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` on one of the pool's threads, once one is free; :class:`Stuck`
        once it has run ``deadline_s``."""
        await self._take_slot()
        job = asyncio.get_running_loop().run_in_executor(self._threads, func, *args)
        # The slot is the thread's: it is freed when the work ends, even if whoever waited
        # for it was cancelled meanwhile (a thread cannot be stopped); or at the deadline,
        # while fewer than ``max_stuck`` threads are left running past theirs.
        released = [False]

        def done(_: object) -> None:
            if released[0]:
                self.stuck -= 1
            else:
                self._slots.release()

        job.add_done_callback(done)
        # Not asyncio.timeout: the operation's own TimeoutError (ETIMEDOUT) is an answer.
        await asyncio.wait({job}, timeout=self.deadline_s)
        if job.done():
            return job.result()
        if self.stuck < self.max_stuck:
            released[0] = True
            self.stuck += 1
            self._slots.release()
        raise Stuck(
            f"the file operation did not end in {self.deadline_s:g}s (a hung file system?); "
            f"{self.stuck} such operations still under way on this probe"
        )

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
