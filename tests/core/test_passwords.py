"""Password hashing off the event loop, with a bounded number of hashes at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from legator.core.auth.passwords import PasswordWorker
from legator.core.errors import TooManyRequests
from legator.core.security import hash_password, verify_password

HASHED = hash_password("correct horse")


async def test_hashing_leaves_the_event_loop_free() -> None:
    worker = PasswordWorker(threads=2)
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    checks = [worker.verify(HASHED, guess) for guess in ("correct horse", "wrong") * 2]
    *matches, new_hash = await asyncio.gather(*checks, worker.hash("new password"))
    done.set()
    await ticker
    assert matches == [True, False, True, False]
    assert verify_password(new_hash, "new password")
    # Free, the loop ticks every 5 ms through five hashes (over a second here); with them on
    # the loop it gets a turn between two hashes only. Counted, not timed: a stalled machine
    # stalls the hashes too.
    assert ticks >= 30, ticks


async def test_a_missing_hash_is_a_mismatch() -> None:
    assert await PasswordWorker().verify(None, "anything") is False


async def test_a_full_worker_refuses_instead_of_queueing() -> None:
    worker = PasswordWorker(threads=1, max_waiting=1)
    first = asyncio.create_task(worker.verify(HASHED, "correct horse"))
    second = asyncio.create_task(worker.verify(HASHED, "wrong"))
    await asyncio.sleep(0)  # both have taken their places
    with pytest.raises(TooManyRequests) as refused:
        await worker.verify(HASHED, "correct horse")
    assert refused.value.headers == {"Retry-After": "1"}
    assert await first is True
    assert await second is False
    assert await worker.verify(HASHED, "correct horse") is True


async def test_a_caller_that_gives_up_keeps_its_place_until_its_hash_ends() -> None:
    worker = PasswordWorker(threads=1, max_waiting=0)
    gone = asyncio.create_task(worker.verify(HASHED, "wrong"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(TooManyRequests):  # its hash still runs in the pool
        await worker.verify(HASHED, "correct horse")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert await worker.verify(HASHED, "correct horse") is True
            break
        except TooManyRequests:
            assert time.monotonic() < deadline, "the pool never freed its place"
            await asyncio.sleep(0.02)
