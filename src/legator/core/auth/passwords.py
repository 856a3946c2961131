"""Password hashing and checking off the event loop.

argon2 is slow on purpose (about 0.1 s of CPU and 64 MiB per call). On the event loop every
sign-in would stall every other request for that long (streams, probes, the gateway), and an
anonymous client could keep the loop stalled with wrong passwords. argon2-cffi releases the
GIL while it hashes, so a small pool of threads does the work; the pool bounds the memory in
use, and a bounded wait keeps a flood of sign-ins from queueing without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from legator.core.errors import TooManyRequests
from legator.core.security import hash_password, verify_password

BUSY_RETRY_AFTER_S = 1
T = TypeVar("T")


class PasswordWorker:
    """At most ``threads`` hashes at once and ``max_waiting`` more waiting for a thread;
    past that a call is refused with 429 rather than queued."""

    def __init__(self, *, threads: int = 2, max_waiting: int = 32) -> None:
        self.capacity = threads + max_waiting
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; as slow for a missing hash as for a real one."""
        return await self._run(partial(verify_password, password_hash, password))

    async def hash(self, password: str) -> str:
        return await self._run(partial(hash_password, password))

    async def _run(self, work: Callable[[], T]) -> T:
        if self._in_flight >= self.capacity:
            raise TooManyRequests(
                "too many sign-ins in progress; try again in a moment",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
        self._in_flight += 1
        try:
            # A cancelled caller (a client gone) leaves its hash to finish in the pool; the
            # count drops only then, so the bound holds for the threads' real work.
            future = asyncio.get_running_loop().run_in_executor(self._pool, work)
            future.add_done_callback(self._done)
        except BaseException:
            self._in_flight -= 1
            raise
        return await asyncio.shield(future)

    def _done(self, _future: asyncio.Future[object]) -> None:
        self._in_flight -= 1
