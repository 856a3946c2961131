"""The usage writer on both databases: every row recorded is written, in batches, by close()."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from legator.core.db import Database, utcnow
from legator.core.db.migrate import upgrade
from legator.gateway import usage
from legator.gateway.metrics import GatewayMetrics
from legator.gateway.models import GatewayUsage
from legator.gateway.scheduler import Scheduler
from legator.gateway.usage import (
    FLUSH_BATCH,
    UsageRecord,
    UsageRecorder,
    prune,
    recent_tokens_by_user,
    report,
    tokens_by_user,
    window,
)
from tests.support import LiveServer, eventually, first_started, live_server, run_cli


def _row(i: int) -> UsageRecord:
    return UsageRecord(
        user_id="user-a" if i % 3 else "user-b",
        username="a" if i % 3 else "b",
        key_id="key-1",
        model_id="m1" if i % 2 else "m2",
        category=None,
        endpoint="chat",
        stream=bool(i % 2),
        input_tokens=3,
        output_tokens=i % 7,
        status=502 if i % 10 == 0 else 200,
    )


@asynccontextmanager
async def _usage_db(url: str) -> AsyncIterator[tuple[Database, UsageRecorder]]:
    """A migrated database at ``url`` and a usage recorder on it, disposed afterwards."""
    db = Database(url)
    try:
        await upgrade(db)
        yield db, UsageRecorder(db)
    finally:
        await db.dispose()


async def _ids(db: Database) -> set[str]:
    async with db.session() as session:
        return set((await session.execute(select(GatewayUsage.id))).scalars())


async def _write_and_read(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        writer = asyncio.create_task(recorder.run())
        rows = [_row(i) for i in range(2 * FLUSH_BATCH + 37)]
        for row in rows:
            recorder.record(row)
        await recorder.close()  # as on a clean shutdown: nothing left in memory
        await writer
        assert recorder.written == len(rows)
        async with db.session() as session:
            count = await session.scalar(select(func.count()).select_from(GatewayUsage))
            ids = list(
                (await session.execute(select(GatewayUsage.id).order_by(GatewayUsage.id))).scalars()
            )
        assert count == len(rows)
        assert set(ids) == {row.id for row in rows}
        assert all(uuid.UUID(i).version == 7 for i in ids)
        totals = await report(db, window("hour"), user_id=None, admin_view=True)
        assert totals.requests == len(rows)
        assert totals.output_tokens == sum(row.output_tokens for row in rows)
        assert {t.group: t.errors for t in totals.by_model} == {
            "m1": 0,
            "m2": sum(1 for i in range(len(rows)) if i % 10 == 0),
        }
        assert totals.by_user is not None
        assert {t.group for t in totals.by_user} == {"a", "b"}
        pairs: dict[tuple[str, str], list[int]] = {}
        for row in rows:
            pair = pairs.setdefault((row.username, row.model_id), [0, 0, 0])
            pair[0] += 1
            pair[1] += row.output_tokens
            pair[2] += int(row.status >= 400)
        assert totals.by_user_and_model is not None
        assert {
            (t.group, t.model): [t.requests, t.output_tokens, t.errors]
            for t in totals.by_user_and_model
        } == pairs
        assert all(t.model is None for t in totals.by_model)
        own = await report(db, window("hour"), user_id="user-b", admin_view=False)
        assert own.by_user_and_model is None and own.by_user is None


async def _flush_waits_for_rows_in_flight(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        rows = [_row(i) for i in range(10)]
        for row in rows:
            recorder.record(row)
        # The background writer takes every row and is mid-write when someone else flushes:
        # that flush finds nothing pending, yet must not return before the rows are written.
        in_flight = asyncio.create_task(recorder.flush())
        await asyncio.sleep(0)
        await recorder.flush()
        assert recorder.written == len(rows)
        async with db.session() as session:
            count = await session.scalar(select(func.count()).select_from(GatewayUsage))
        assert count == len(rows)
        await in_flight


def test_a_flush_returns_only_once_rows_in_flight_are_written(tmp_path: Path) -> None:
    asyncio.run(_flush_waits_for_rows_in_flight(f"sqlite+aiosqlite:///{tmp_path}/usage.db"))


def test_every_row_is_written(db_url: str) -> None:
    asyncio.run(_write_and_read(db_url))


async def _hooks_see_committed_batches(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        seen: list[tuple[int, int]] = []  # (rows in the batch, rows in the table meanwhile)

        def count_committed(batch: list[UsageRecord]) -> None:
            seen.append((len(batch), recorder.written))

        def broken(batch: list[UsageRecord]) -> None:
            raise RuntimeError("a hook that fails")

        recorder.on_written += [broken, count_committed]
        rows = [_row(i) for i in range(FLUSH_BATCH + 5)]
        for row in rows:
            recorder.record(row)
        await recorder.flush()
        # Each batch once, after its commit; a failing hook loses no row and stops no other.
        assert seen == [(FLUSH_BATCH, FLUSH_BATCH), (5, FLUSH_BATCH + 5)]
        assert recorder.pending == []
        async with db.session() as session:
            count = await session.scalar(select(func.count()).select_from(GatewayUsage))
        assert count == len(rows)


def test_hooks_see_each_batch_once_it_is_committed(tmp_path: Path) -> None:
    asyncio.run(_hooks_see_committed_batches(f"sqlite+aiosqlite:///{tmp_path}/usage.db"))


def test_tokens_by_user_leaves_out_rows_without_a_user_or_tokens() -> None:
    rows = [_row(i) for i in range(7)]
    rows[1].user_id = None
    rows[2].input_tokens = rows[2].output_tokens = 0
    expected: dict[str, int] = {}
    for i, row in enumerate(rows):
        if i not in (1, 2):
            assert row.user_id is not None
            expected[row.user_id] = expected.get(row.user_id, 0) + 3 + i % 7
    assert tokens_by_user(rows) == expected
    assert "user-b" in expected and "user-a" in expected


async def _old_rows_go_oldest_first(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        now = utcnow()
        ages = [40, 35, 31, 29, 1, 0]  # days
        rows = []
        for i, days in enumerate(ages):
            for j in range(7):  # more than one batch of 5 per age
                row = _row(i * 7 + j)
                row.ts = now - timedelta(days=days, minutes=j)
                rows.append(row)
                recorder.record(row)
        await recorder.flush()
        cutoff = now - timedelta(days=30)
        assert await prune(db, cutoff, batch=5) == 3 * 7
        assert await prune(db, cutoff, batch=5) == 0
        kept = await _ids(db)
        assert kept == {row.id for row in rows if row.ts >= cutoff}
        # The monthly report still sees every row of its 30 days.
        assert (await report(db, window("month"), user_id=None, admin_view=True)).requests == 3 * 7


def test_rows_past_retention_are_deleted(db_url: str) -> None:
    asyncio.run(_old_rows_go_oldest_first(db_url))


def _usage_ids(url: str, rows: list[UsageRecord] | None = None) -> set[str]:
    """Writes ``rows`` (if any) into the database at ``url``; the ids of every row there."""

    async def go() -> set[str]:
        db = Database(url)  # not migrated again: the server may be running on it
        try:
            recorder = UsageRecorder(db)
            for row in rows or []:
                recorder.record(row)
            await recorder.flush()
            return await _ids(db)
        finally:
            await db.dispose()

    return asyncio.run(go())


@pytest.mark.parametrize("retention_days", [31, 0])
def test_a_server_deletes_rows_past_its_retention_as_it_starts(
    tmp_path: Path, retention_days: int
) -> None:
    data = tmp_path / "data"
    url = first_started(data)
    old, recent = _row(1), _row(2)
    old.ts, recent.ts = utcnow() - timedelta(days=32), utcnow() - timedelta(days=30)
    assert _usage_ids(url, [old, recent]) == {old.id, recent.id}
    with live_server(data, gateway_usage_retention_days=retention_days):
        kept = {recent.id} if retention_days else {old.id, recent.id}
        eventually(lambda: _usage_ids(url), kept)


async def _outage_keeps_memory_bounded(path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{path}")  # no tables yet: every write fails
    registry = CollectorRegistry()
    recorder = UsageRecorder(db)
    GatewayMetrics(registry, Scheduler(), recorder)
    writer = asyncio.create_task(recorder.run())
    try:
        rows = [_row(i) for i in range(usage.MAX_PENDING + 7)]
        for row in rows:
            recorder.record(row)
        await asyncio.sleep(0.1)  # the writer tries, fails, and keeps the rows
        assert (recorder.waiting, recorder.dropped, recorder.written) == (usage.MAX_PENDING, 7, 0)
        assert registry.get_sample_value("legator_gateway_usage_rows_pending") == usage.MAX_PENDING
        assert registry.get_sample_value("legator_gateway_usage_rows_dropped_total") == 7
        await upgrade(db)  # the database is back
        await recorder.close()
        await writer
        kept = await _ids(db)
        assert kept == {row.id for row in rows[: usage.MAX_PENDING]}  # the oldest are kept
        assert registry.get_sample_value("legator_gateway_usage_rows_pending") == 0
    finally:
        writer.cancel()
        await db.dispose()


def test_an_outage_drops_rows_past_the_cap_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage, "MAX_PENDING", 1_200)
    asyncio.run(_outage_keeps_memory_bounded(tmp_path / "usage.db"))


async def _replicas_prune_together(url: str) -> None:
    first, second = Database(url), Database(url)  # two replicas on one database
    try:
        await upgrade(first)
        recorder = UsageRecorder(first)
        old = utcnow() - timedelta(days=40)
        for i in range(3_000):
            row = _row(i)
            row.ts = old + timedelta(seconds=i)
            recorder.record(row)
        await recorder.flush()
        cutoff = utcnow() - timedelta(days=30)
        counts = await asyncio.gather(
            prune(first, cutoff, batch=100), prune(second, cutoff, batch=100)
        )
        counts.append(await prune(second, cutoff, batch=100))  # whatever either left
        assert sum(counts) == 3_000
        assert await _ids(first) == set()
    finally:
        await first.dispose()
        await second.dispose()


@pytest.mark.postgres
def test_replicas_pruning_at_once_share_the_rows(pg_url: str) -> None:
    asyncio.run(_replicas_prune_together(pg_url))


async def _timeline_is_bucketed_by_the_database(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        now = utcnow()
        rows = []
        for i, minutes_ago in enumerate([1, 2, 2, 61, 62, 300, 1500]):
            row = _row(i)
            row.ts = now - timedelta(minutes=minutes_ago)
            rows.append(row)
            recorder.record(row)
        await recorder.flush()
        for period, width, span in (("hour", 16, 60), ("day", 13, 24 * 60)):
            expected: dict[str, list[int]] = {}
            for row in rows:
                if row.ts >= now - timedelta(minutes=span) - timedelta(seconds=5):
                    slot = expected.setdefault(row.ts.isoformat()[:width], [0, 0, 0, 0])
                    slot[0] += 1
                    slot[1] += row.input_tokens
                    slot[2] += row.output_tokens
                    slot[3] += int(row.status >= 400)
            timeline = (await report(db, window(period), user_id=None, admin_view=True)).timeline
            got = {
                t.group: [t.requests, t.input_tokens, t.output_tokens, t.errors] for t in timeline
            }
            assert got == expected, period
            assert [t.group for t in timeline] == sorted(expected)


def test_the_timeline_is_bucketed_by_the_database(db_url: str) -> None:
    asyncio.run(_timeline_is_bucketed_by_the_database(db_url))


def test_a_report_covers_a_range_and_refuses_a_bad_one(gw: LiveServer, admin: httpx.Client) -> None:
    # Rows straight into the database: November 2026 (2), the last second of October, and
    # December the first at midnight, which a range ending then excludes.
    rows = [_row(i) for i in range(4)]
    rows[0].ts = datetime(2026, 11, 1, tzinfo=UTC)
    rows[1].ts = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    rows[2].ts = datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    rows[3].ts = datetime(2026, 12, 1, tzinfo=UTC)
    recorder = gw.app.state.gateway.recorder  # type: ignore[union-attr]
    for row in rows:
        recorder.record(row)
    gw.call(recorder.flush())

    november = {"since": "2026-11-01", "until": "2026-12-01T00:00:00Z"}  # no zone: UTC
    report = admin.get("/api/v1/gateway/usage/all", params=november)
    assert report.status_code == 200, report.text
    body = report.json()
    assert (body["period"], body["bucket"], body["requests"]) == ("range", "day", 2)
    assert body["since"].startswith("2026-11-01T00:00:00") and body["until"].startswith(
        "2026-12-01T00:00:00"
    )
    assert [(t["group"], t["requests"], t["errors"]) for t in body["timeline"]] == [
        ("2026-11-01", 1, 1),  # _row(0) is a 502
        ("2026-11-30", 1, 0),
    ]
    # A zone other than UTC is converted: 2026-11-30 23:00 UTC onwards holds one row.
    late = admin.get(
        "/api/v1/gateway/usage/all",
        params={"since": "2026-12-01T00:00:00+01:00", "until": "2026-12-01T00:00:00Z"},
    ).json()
    assert (late["bucket"], late["requests"]) == ("minute", 1)

    for params, message in (
        ({"period": "day", "since": "2026-11-01"}, "either period or since/until"),
        ({"until": "2026-11-01"}, "until needs since"),
        ({"since": "2026-11-02", "until": "2026-11-01"}, "since must be before until"),
        ({"since": "2024-01-01", "until": "2026-01-01"}, "at most 366 days"),
        ({"since": "yesterday"}, "since"),
        ({"since": "0001-01-01T00:00:00+14:00"}, "outside the years 1 to 9999 in UTC"),
        (
            {"since": "9999-12-31T00:00:00Z", "until": "9999-12-31T23:59:59-14:00"},
            "outside the years 1 to 9999 in UTC",
        ),
    ):
        bad = admin.get("/api/v1/gateway/usage/all", params=params)
        assert bad.status_code in (400, 422), (params, bad.text)
        assert message in bad.text, (params, bad.text)


def test_the_cli_prints_a_range_by_user_and_model(gw: LiveServer) -> None:
    recorder = gw.app.state.gateway.recorder  # type: ignore[union-attr]
    rows = [_row(i) for i in range(6)]
    for i, row in enumerate(rows):
        row.ts = datetime(2026, 11, 3 + i, 12, tzinfo=UTC)
        recorder.record(row)
    gw.call(recorder.flush())
    env = {"LEGATOR_SERVER_URL": gw.url, "LEGATOR_API_KEY": gw.admin_key}
    november = ["--since", "2026-11-01", "--until", "2026-12-01"]
    listed = run_cli("legator", "usage", "--all", "--by", "user-model", *november, env=env)
    assert listed.returncode == 0, listed.stderr
    cells = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in listed.stdout.splitlines()
        if line.startswith("│")
    ]
    assert [c[:3] for c in cells] == [
        ["a", "m1", "2"],
        ["a", "m2", "2"],
        ["b", "m1", "1"],
        ["b", "m2", "1"],
    ], listed.stdout
    assert "total: 6 requests" in listed.stdout
    as_json = run_cli("legator", "usage", "--all", *november, "--json", env=env)
    pairs = json.loads(as_json.stdout)["by_user_and_model"]
    assert sum(p["requests"] for p in pairs) == 6
    assert {(p["group"], p["model"]) for p in pairs} == {(r.username, r.model_id) for r in rows}
    # Another user's totals need --all; a bad range is the server's 400, exit code 2.
    own = run_cli("legator", "usage", "--by", "user", env=env)
    assert own.returncode == 2 and "needs --all" in own.stderr
    bad = run_cli("legator", "usage", "--since", "2026-11-02", "--until", "2026-11-01", env=env)
    assert bad.returncode == 2 and "since must be before until" in bad.stderr


async def _seed_is_summed_per_minute(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        now = utcnow()
        rows = []
        for i in range(600):  # 10 a minute for an hour, two users, one row without a user
            row = _row(i)
            row.ts = now - timedelta(seconds=6 * i + 3)  # none within 3 s of the window's edge
            rows.append(row)
            recorder.record(row)
        rows[5].user_id = None
        await recorder.flush()
        seeded = await recent_tokens_by_user(db, timedelta(minutes=30))
        assert len(seeded) <= 2 * 32  # per user and minute, not per row
        assert [t for _u, t, _n in seeded] == sorted(t for _u, t, _n in seeded)
        assert all(t.second == 0 and t.tzinfo is not None for _u, t, _n in seeded)
        expected: dict[str, int] = {}
        for row in rows:
            if row.user_id and row.ts >= now - timedelta(minutes=30):
                tokens = row.input_tokens + row.output_tokens
                expected[row.user_id] = expected.get(row.user_id, 0) + tokens
        got: dict[str, int] = {}
        for user, _t, tokens in seeded:
            got[user] = got.get(user, 0) + tokens
        assert got == expected


def test_the_scheduler_is_seeded_per_minute(db_url: str) -> None:
    asyncio.run(_seed_is_summed_per_minute(db_url))


async def _a_refused_row_is_dropped_alone(url: str) -> None:
    async with _usage_db(url) as (db, recorder):
        registry = CollectorRegistry()
        GatewayMetrics(registry, Scheduler(), recorder)
        committed: list[str] = []
        recorder.on_written.append(lambda batch: committed.extend(r.id for r in batch))
        rows = [_row(i) for i in range(FLUSH_BATCH + 40)]
        # What a database refuses for what a row holds: too long for its column, out of range.
        rows[3].model_id = "m" * 101
        rows[FLUSH_BATCH + 7].input_tokens = 2**40
        for row in rows:
            recorder.record(row)
        await recorder.flush()
        good = {row.id for i, row in enumerate(rows) if i not in (3, FLUSH_BATCH + 7)}
        assert await _ids(db) & {row.id for row in rows} == good
        assert set(committed) == good and len(committed) == len(good)
        assert (recorder.written, recorder.refused, recorder.waiting) == (len(good), 2, 0)
        assert registry.get_sample_value("legator_gateway_usage_rows_refused_total") == 2


@pytest.mark.postgres
def test_a_row_the_database_refuses_is_dropped_alone(pg_url: str) -> None:
    # SQLite takes any length and any integer; PostgreSQL checks both. Through asyncpg, as
    # the server connects (its class-22 errors are no DataError there), and psycopg.
    asyncio.run(_a_refused_row_is_dropped_alone(pg_url))
    asyncio.run(
        _a_refused_row_is_dropped_alone(pg_url.replace("postgresql:", "postgresql+psycopg:"))
    )


async def _an_outage_mid_batch_keeps_the_unwritten_rows(path: Path) -> None:
    async with _usage_db(f"sqlite+aiosqlite:///{path}") as (db, recorder):
        rows = [_row(i) for i in range(FLUSH_BATCH + 10)]
        for row in rows:
            recorder.record(row)
        real_write = db.write
        calls = 0

        def write_then_fail():  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 2:
                raise ConnectionError("the database went away")
            return real_write()

        db.write = write_then_fail  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await recorder.flush()
        assert recorder.written == FLUSH_BATCH and recorder.waiting == 10
        db.write = real_write  # type: ignore[method-assign]
        await recorder.flush()
        assert await _ids(db) == {row.id for row in rows}


def test_an_outage_after_a_batch_keeps_only_the_unwritten_rows(tmp_path: Path) -> None:
    asyncio.run(_an_outage_mid_batch_keeps_the_unwritten_rows(tmp_path / "usage.db"))
