"""Usage accounting: one row per request, written in batches off the request path, and the
reports built from them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, String, case, func, insert, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from legator.core.db import Database, new_sorted_id, retention, utcnow
from legator.core.logging import get_logger
from legator.gateway.models import GatewayUsage
from legator.gateway.schemas import UsageReport, UsageTotals

log = get_logger("legator.gateway.usage")
Period = Literal["hour", "day", "week", "month"]
PERIODS: dict[str, tuple[timedelta, str]] = {
    # period -> (how far back, timeline bucket)
    "hour": (timedelta(hours=1), "minute"),
    "day": (timedelta(days=1), "hour"),
    "week": (timedelta(weeks=1), "day"),
    "month": (timedelta(days=30), "day"),
}
_BUCKET_CHARS = {"minute": 16, "hour": 13, "day": 10}  # prefix of an ISO timestamp
_BUCKET_FORMATS = {
    "minute": 'YYYY-MM-DD"T"HH24:MI',
    "hour": 'YYYY-MM-DD"T"HH24',
    "day": "YYYY-MM-DD",
}
FLUSH_INTERVAL_S = 0.5
FLUSH_BATCH = 500
# Rows held while the database refuses them (about 70 MB at 340 bytes each): past this, new
# rows are dropped and counted rather than letting an outage grow the process until killed.
MAX_PENDING = 200_000
_INSERT = insert(GatewayUsage.__table__)


@dataclass
class UsageRecord:
    user_id: str | None
    username: str
    key_id: str | None
    model_id: str
    category: str | None
    endpoint: str
    stream: bool
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int = 0
    queued_ms: int = 0
    status: int = 200
    ts: datetime = field(default_factory=utcnow)
    id: str = field(default_factory=new_sorted_id)


def tokens_by_user(rows: list[UsageRecord]) -> dict[str, int]:
    """Each user's tokens in ``rows`` (rows of no user and of no tokens left out)."""
    totals: dict[str, int] = {}
    for row in rows:
        tokens = row.input_tokens + row.output_tokens
        if row.user_id and tokens > 0:
            totals[row.user_id] = totals.get(row.user_id, 0) + tokens
    return totals


def _refused_for_content(exc: DBAPIError) -> bool:
    """Whether the database refused the rows for what they hold (SQLSTATE class 22, data
    exception, or 23, integrity constraint), not for being out of reach. asyncpg's errors
    of class 22 reach SQLAlchemy as a plain ``DBAPIError``: the SQLSTATE tells."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(state, str) and state[:2] in ("22", "23")


class UsageRecorder:
    """Rows are appended in memory and written every half second; ``close()`` writes the rest.
    Each ``on_written`` hook sees every batch once it is committed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        # Held while rows are out of ``_pending`` but not yet committed: a flush that comes
        # meanwhile waits for them instead of returning with nothing left to write.
        self.writing = asyncio.Lock()
        self._closed = False
        self.written = 0
        self.dropped = 0  # rows lost because MAX_PENDING were already waiting
        self.refused = 0  # rows the database refused for what they hold
        self._dropped_reported = 0
        self.on_written: list[Callable[[list[UsageRecord]], None]] = []

    @property
    def pending(self) -> list[UsageRecord]:
        """Rows recorded but not yet taken to be written."""
        return list(self._pending)

    @property
    def waiting(self) -> int:
        """How many rows are recorded but not yet taken to be written."""
        return len(self._pending)

    def record(self, row: UsageRecord) -> None:
        if len(self._pending) >= MAX_PENDING:
            if self.dropped == self._dropped_reported:
                log.error(
                    "usage rows are being dropped: the database has not taken any for a while",
                    waiting=len(self._pending),
                )
            self.dropped += 1
            return
        self._pending.append(row)
        if len(self._pending) >= FLUSH_BATCH:
            self._wake.set()

    async def flush(self) -> None:
        """Write every row recorded so far, including rows another flush is writing."""
        async with self.writing:
            while self._pending:
                batch, self._pending = self._pending[:FLUSH_BATCH], self._pending[FLUSH_BATCH:]
                await self._write(batch)

    async def _write(self, batch: list[UsageRecord]) -> None:
        """Insert ``batch``. A batch the database refuses for what a row holds (a value too
        long or out of range) is split until the rows at fault are alone, and those are
        dropped and counted: one bad row must not hold back every row after it, forever.
        Any other failure (the database out of reach) puts the unwritten rows back and
        raises, so that the next flush retries them."""
        parts = [batch]
        while parts:
            part = parts.pop(0)
            try:
                async with self.db.write() as session:
                    # The table's Core insert: the ORM's bulk path costs a fifth more per row.
                    await session.execute(_INSERT, [vars(r) for r in part])
            except DBAPIError as exc:
                if not _refused_for_content(exc):
                    self._pending[:0] = [row for rows in (part, *parts) for row in rows]
                    raise
                if len(part) > 1:
                    half = len(part) // 2
                    parts[:0] = [part[:half], part[half:]]
                else:
                    self._refuse(part[0], exc)
                continue
            except Exception:
                self._pending[:0] = [row for rows in (part, *parts) for row in rows]
                raise
            self.written += len(part)
            for hook in self.on_written:
                try:
                    hook(part)
                except Exception:
                    log.exception("a usage hook failed")

    def _refuse(self, row: UsageRecord, exc: DBAPIError) -> None:
        self.refused += 1
        log.error(
            "the database refused a usage row; it is dropped",
            row_id=row.id,
            user=row.username,
            model=row.model_id,
            # The driver's first line ("value too long for type character varying(100)"),
            # not the statement and its parameters.
            error=(str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0],
        )

    async def run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage rows failed; retrying")
                await asyncio.sleep(1)
                continue
            if self.dropped > self._dropped_reported:
                log.error(
                    "usage rows are written again; some were dropped meanwhile",
                    dropped=self.dropped - self._dropped_reported,
                )
                self._dropped_reported = self.dropped

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await self.flush()


async def prune(db: Database, before: datetime, *, batch: int = retention.PRUNE_BATCH) -> int:
    """Delete the usage rows from before ``before``, oldest first; returns how many went."""
    return await retention.prune(db, GatewayUsage.id, GatewayUsage.ts, before, batch=batch)


def _totals(rows: list[Any]) -> list[UsageTotals]:
    """Rows of (group, [model,] requests, input, output, errors)."""
    return [
        UsageTotals(
            group=str(r[0] or "-"),
            model=r[1] if len(r) == 6 else None,
            requests=int(r[-4]),
            input_tokens=int(r[-3] or 0),
            output_tokens=int(r[-2] or 0),
            errors=int(r[-1] or 0),
        )
        for r in rows
    ]


MAX_RANGE = timedelta(days=366)


@dataclass(frozen=True)
class Window:
    """What a report covers: [since, until), and its timeline's bucket."""

    period: str  # hour, day, week, month, or "range" for since/until
    since: datetime
    until: datetime
    bucket: str


def window(
    period: Period | None = None, since: datetime | None = None, until: datetime | None = None
) -> Window:
    """The report's window: a ``period`` back from now (default a day), or ``since`` to
    ``until`` (default now), times without a zone being UTC. ValueError says what is wrong."""
    now = utcnow()
    if since is None and until is None:
        span, bucket = PERIODS[period or "day"]
        return Window(period or "day", now - span, now, bucket)
    if period is not None:
        raise ValueError("give either period or since/until, not both")
    if since is None:
        raise ValueError("until needs since")
    since, until = _utc(since), _utc(until) if until is not None else now
    if since >= until:
        raise ValueError("since must be before until")
    span = until - since
    if span > MAX_RANGE:
        raise ValueError(f"a report covers at most {MAX_RANGE.days} days")
    bucket = (
        "minute" if span <= timedelta(hours=2) else "hour" if span <= timedelta(days=3) else "day"
    )
    return Window("range", since, until, bucket)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is in the year 0 in UTC
        raise ValueError(f"{moment.isoformat()} is outside the years 1 to 9999 in UTC") from None


async def report(
    db: Database, span: Window, *, user_id: str | None, admin_view: bool
) -> UsageReport:
    base = [GatewayUsage.ts >= span.since, GatewayUsage.ts < span.until]
    if user_id is not None:
        base.append(GatewayUsage.user_id == user_id)
    aggregates = (
        func.count(),
        func.sum(GatewayUsage.input_tokens),
        func.sum(GatewayUsage.output_tokens),
        func.sum(case((GatewayUsage.status >= 400, 1), else_=0)),
    )

    async def grouped(*columns: Any) -> list[UsageTotals]:
        query = select(*columns, *aggregates).where(*base).group_by(*columns).order_by(*columns)
        return _totals(list((await session.execute(query)).all()))

    async with db.session() as session:
        total = (await session.execute(select(*aggregates).where(*base))).one()
        by_model = await grouped(GatewayUsage.model_id)
        by_user = await grouped(GatewayUsage.username) if admin_view else None
        by_key = await grouped(GatewayUsage.key_id) if admin_view else None
        by_user_and_model = (
            await grouped(GatewayUsage.username, GatewayUsage.model_id) if admin_view else None
        )
        timeline = await grouped(_bucket(db, span.bucket))
    return UsageReport(
        period=span.period,
        since=span.since,
        until=span.until,
        bucket=span.bucket,
        requests=int(total[0]),
        input_tokens=int(total[1] or 0),
        output_tokens=int(total[2] or 0),
        by_model=by_model,
        by_user=by_user,
        by_key=by_key,
        by_user_and_model=by_user_and_model,
        timeline=timeline,
    )


def _bucket(db: Database, bucket: str) -> ColumnElement[str]:
    """A row's timeline bucket, ``YYYY-MM-DDTHH:MM`` cut to the bucket's width, computed by the
    database: a month of a busy gateway's rows is millions, too many to carry over."""
    if db.is_sqlite:
        # UTCDateTime keeps SQLite's values as UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff'.
        prefix = func.substr(GatewayUsage.ts, 1, _BUCKET_CHARS[bucket], type_=String)
        return func.replace(prefix, " ", "T", type_=String)
    return func.to_char(func.timezone("UTC", GatewayUsage.ts), _BUCKET_FORMATS[bucket])


async def recent_tokens_by_user(db: Database, window: timedelta) -> list[tuple[str, datetime, int]]:
    """(user, minute, tokens) over the last window, oldest first, to seed the scheduler after a
    restart: summed per minute by the database, since the window may hold millions of rows."""
    minute = _bucket(db, "minute")
    tokens = func.sum(GatewayUsage.input_tokens + GatewayUsage.output_tokens)
    query = (
        select(GatewayUsage.user_id, minute, tokens)
        .where(GatewayUsage.ts >= utcnow() - window, GatewayUsage.user_id.is_not(None))
        .group_by(GatewayUsage.user_id, minute)
        .order_by(minute)
    )
    async with db.session() as session:
        rows = (await session.execute(query)).all()
    return [(r[0], datetime.fromisoformat(r[1]).replace(tzinfo=UTC), int(r[2] or 0)) for r in rows]
