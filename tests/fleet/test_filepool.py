"""File operations stuck on a hung file system do not hold the probe's file threads for
good. A read blocked in the kernel is stood in for by a thread blocked on an event."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from legator.fleet.protocol import FileRequest
from legator.probe import fileops
from legator.probe.filepool import Busy, FilePool, Stuck

WORKERS = 4


def _hang(release: threading.Event) -> str:
    release.wait(60)
    return "late"


def test_operations_past_their_deadline_free_their_slots() -> None:
    release = threading.Event()

    async def scenario() -> None:
        pool = FilePool(workers=WORKERS, wait_s=2.0, deadline_s=0.3, max_stuck=8)
        hung = [asyncio.create_task(pool.run(_hang, release)) for _ in range(WORKERS)]
        for task in hung:
            with pytest.raises(Stuck, match=r"did not end in 0\.3s"):
                await task
        assert pool.stuck == WORKERS
        # Every slot's thread is still blocked, and the next operation runs all the same.
        assert await pool.run(str.upper, "next") == "NEXT"
        release.set()
        for _ in range(200):
            if pool.stuck == 0:
                break
            await asyncio.sleep(0.05)
        assert pool.stuck == 0

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_past_max_stuck_a_stuck_operation_keeps_its_slot() -> None:
    release = threading.Event()

    async def scenario() -> None:
        pool = FilePool(workers=1, queue=4, wait_s=0.5, deadline_s=0.2, max_stuck=1)
        for _ in range(2):
            with pytest.raises(Stuck):
                await pool.run(_hang, release)
        assert pool.stuck == 1  # the second one holds the only slot
        with pytest.raises(Busy):
            await pool.run(str.upper, "refused")

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # open(O_RDONLY) of a FIFO with no writer would block for good
    request = FileRequest(request_id="r1", op="read", path=str(fifo))
    with pytest.raises(fileops.FileDenied, match="not a regular file"):
        asyncio.run(FilePool().run(fileops.perform, request, [str(tmp_path)], None))
