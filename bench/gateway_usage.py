"""Usage rows at volume, on SQLite: how long a report takes and how much memory it needs, and
how fast retention deletes a backlog while another writer keeps writing.

``GATEWAY_USAGE_ROWS`` rows (300,000) spread over the last day, then ``report`` for the day
(hourly timeline) as the API builds it; then the same number of rows 200 days old pruned
while a second writer commits a row every 10 ms and records how long each commit waited.

Run: ``.venv/bin/python -m bench gateway_usage``
"""

from __future__ import annotations

import asyncio
import os
import resource
import tempfile
import time
from datetime import timedelta
from typing import Any

from bench.common import percentile, report
from legator.core.db import Database, utcnow
from legator.core.db.migrate import upgrade
from legator.gateway import usage
from legator.gateway.usage import UsageRecord, UsageRecorder

DAY_S = 86_400


def _row(i: int, ts_offset_s: float) -> UsageRecord:
    return UsageRecord(
        user_id=f"user-{i % 50}",
        username=f"user-{i % 50}",
        key_id=f"key-{i % 80}",
        model_id=f"model-{i % 5}",
        category=None,
        endpoint="chat",
        stream=True,
        input_tokens=30,
        output_tokens=200,
        status=502 if i % 100 == 0 else 200,
        ts=utcnow() - timedelta(seconds=ts_offset_s),
    )


async def _fill(recorder: UsageRecorder, count: int, oldest_s: float, span_s: float) -> None:
    for i in range(count):
        recorder.record(_row(i, oldest_s - i * span_s / count))
        if recorder.waiting >= 50_000:
            await recorder.flush()
    await recorder.flush()


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _measure(count: int) -> list[dict[str, Any]]:
    path = os.path.join(tempfile.mkdtemp(prefix="legator-bench-usage-"), "usage.db")
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(db)
        recorder = UsageRecorder(db)
        await _fill(recorder, count, DAY_S - 60, DAY_S - 120)
        rss = _max_rss_mb()
        started = time.perf_counter()
        day = await usage.report(db, usage.window("day"), user_id=None, admin_view=True)
        report_s = time.perf_counter() - started
        assert day.requests == count, day.requests

        await _fill(recorder, count, 200 * DAY_S, DAY_S)
        waits: list[float] = []
        done = False

        async def other_writer() -> None:
            while not done:
                recorder.record(_row(0, 0))
                began = time.perf_counter()
                await recorder.flush()
                waits.append(time.perf_counter() - began)
                await asyncio.sleep(0.01)

        writer = asyncio.create_task(other_writer())
        started = time.perf_counter()
        pruned = await usage.prune(db, utcnow() - timedelta(days=90))
        prune_s = time.perf_counter() - started
        done = True
        await writer
        assert pruned == count, pruned
    finally:
        await db.dispose()
    return [
        {
            "case": f"report, a day of {count:,} rows",
            "seconds": report_s,
            "rows_per_s": count / report_s,
            "max_rss_growth_mb": _max_rss_mb() - rss,
            "writer_wait_p50_ms": float("nan"),
            "writer_wait_max_ms": float("nan"),
        },
        {
            "case": f"prune {count:,} old rows",
            "seconds": prune_s,
            "rows_per_s": count / prune_s,
            "max_rss_growth_mb": float("nan"),
            "writer_wait_p50_ms": percentile(waits, 50) * 1000,
            "writer_wait_max_ms": max(waits) * 1000,
        },
    ]


def main() -> None:
    count = int(os.environ.get("GATEWAY_USAGE_ROWS", "300000"))
    rows = asyncio.run(_measure(count))
    report("gateway_usage", "Usage rows at volume (SQLite)", rows, rows_per_case=count)
