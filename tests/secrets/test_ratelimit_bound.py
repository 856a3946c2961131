"""The per-source rate table stays within its bound however many sources are active at once:
idle buckets go first, then a new source is refused (429) rather than the table growing."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from legator.secrets.ratelimit import MAX_SOURCES, Limiter, RateLimit
from tests.secrets.conftest import LegerdThread, make_config
from tests.support import FakeClock

SOURCES = 50_000


def test_fifty_thousand_active_sources_keep_the_table_within_its_bound() -> None:
    """Before: every source calling within the refill time was kept, so the table grew
    with the number of sources (20,000 buckets, 3.6 MB traced, for 20,000 sources), and
    each call past 10,000 scanned the whole table (20,000 sources took 135 s; 50,000 did not
    finish in 15 minutes). Now 10,000 buckets, 2.1 MB, and under a second."""
    clock = FakeClock()
    limiter = Limiter(RateLimit(), clock)  # the defaults: 50 a second, a burst of 1000
    tracemalloc.start()
    try:
        admitted = 0
        for n in range(SOURCES):
            clock.now += 1 / SOURCES  # all within one second: every bucket still in use
            if not limiter.wait(f"100.64.{n // 250}.{n % 250}"):
                assert n == admitted, f"source {n} admitted after {admitted} others"
                admitted += 1
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) == admitted == MAX_SOURCES
    assert size < 4 << 20, f"{size} bytes traced for {len(limiter)} buckets"


def test_a_refused_new_source_is_told_when_the_oldest_bucket_refills() -> None:
    clock = FakeClock()
    limit = RateLimit(per_second=10.0, burst=100, max_sources=3)  # refills in 10 s
    limiter = Limiter(limit, clock)
    for n in range(3):
        assert limiter.wait(f"s{n}") == 0.0
        clock.now += 1.0
    assert limiter.wait("new") == pytest.approx(10.0 - 3.0)
    assert not limiter.tracks("new")
    assert limiter.wait("s1") == 0.0  # the sources already counted go on being served
    clock.now += 7.0  # s0, last seen 10 s ago, has refilled: it makes room
    assert limiter.wait("new") == 0.0
    assert len(limiter) == 3 and not limiter.tracks("s0") and limiter.tracks("new")


def test_idle_buckets_are_dropped_before_new_sources_are_refused() -> None:
    clock = FakeClock()
    limiter = Limiter(RateLimit(per_second=50.0, burst=1000), clock)  # refills in 20 s
    for n in range(MAX_SOURCES):
        limiter.wait(f"old{n}")
    clock.now += 20.0
    for n in range(MAX_SOURCES):
        assert limiter.wait(f"new{n}") == 0.0
    assert len(limiter) == MAX_SOURCES
    assert not any(limiter.tracks(f"old{n}") for n in range(MAX_SOURCES))


def test_a_dropped_bucket_is_the_same_as_a_full_one() -> None:
    """Dropping is safe only once a bucket has refilled: a throttled source is not let off
    by being dropped."""
    clock = FakeClock()
    limiter = Limiter(RateLimit(per_second=1.0, burst=2, max_sources=2), clock)
    assert limiter.wait("a") == 0.0 and limiter.wait("a") == 0.0
    assert limiter.wait("a") == pytest.approx(1.0)  # throttled
    assert limiter.wait("b") == 0.0
    assert limiter.wait("c") > 0  # full, and neither a nor b has refilled
    assert limiter.wait("a") == pytest.approx(1.0)  # still throttled, still counted


def test_legerd_answers_a_source_beyond_the_bound_with_429(
    tmp_path: Path, shared_dir: Path
) -> None:
    """End to end: the third source, while two are counted, is refused with a Retry-After
    and a line saying why; the two counted sources go on being served."""
    limit = RateLimit(per_second=0.01, burst=100, max_sources=2)  # nothing refills in a test
    config = make_config(tmp_path / "state", shared_dir, None, dev=True, rate_limit=limit)
    with LegerdThread(config) as running:
        for source in ("127.0.0.2", "127.0.0.3"):
            with running.tcp(source) as client:
                assert client.post("/api/list", content=b"{}").status_code == 200
        with running.tcp("127.0.0.4") as client:
            refused = client.post("/api/list", content=b"{}")
        with running.tcp("127.0.0.2") as client:
            assert client.post("/api/list", content=b"{}").status_code == 200
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.text.startswith("rate limit exceeded: calls from 2 other callers")
