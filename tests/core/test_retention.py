"""The hourly deletion of old rows: its cutoff, and that a failed pass does not end it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from legator.core.db import retention, utcnow


async def test_keep_for_prunes_each_interval_and_outlives_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retention, "PRUNE_INTERVAL_S", 0.01)
    cutoffs: list[datetime] = []

    async def prune_before(before: datetime) -> int:
        cutoffs.append(before)
        if len(cutoffs) == 1:
            raise RuntimeError("the database went away")
        return 3

    task = asyncio.create_task(retention.keep_for("things", 30, prune_before))
    try:
        async with asyncio.timeout(5):
            while len(cutoffs) < 3:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    expected = utcnow() - timedelta(days=30)
    assert all(abs(cutoff - expected) < timedelta(seconds=5) for cutoff in cutoffs)
