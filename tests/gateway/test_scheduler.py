"""Scheduler properties under a virtual clock, plus a concurrency stress test on the real loop."""

from __future__ import annotations

import asyncio
import random

import pytest

from legator.gateway.scheduler import (
    Lease,
    PoolClosed,
    QueueFull,
    QueueTimeout,
    Scheduler,
    SchedulerConfig,
    SlotPool,
    UsageWindow,
    VirtualClock,
    priority,
)
from legator.gateway.service import wait_for_slot


def make_pool(
    parallel: int = 1, clock: VirtualClock | None = None, **config: float
) -> tuple[Scheduler, SlotPool, VirtualClock]:
    clock = clock or VirtualClock()
    scheduler = Scheduler(SchedulerConfig(**config), clock)  # type: ignore[arg-type]
    return scheduler, scheduler.pool("m", parallel), clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def queue(pool: SlotPool, user: str, order: list[str]) -> asyncio.Task[Lease]:
    async def run() -> Lease:
        lease = await pool.acquire(user)
        order.append(user)
        return lease

    return asyncio.create_task(run())


def test_priority_formula() -> None:
    config = SchedulerConfig()
    assert priority(config, 0, 0) == 100
    assert priority(config, 5, 0) == 105
    assert priority(config, 0, 1000) == pytest.approx(100 - 10 * 0.6931471805599453)


async def test_free_slot_is_taken_at_once_and_released() -> None:
    _, pool, _ = make_pool(parallel=2)
    a = await pool.acquire("u")
    b = await pool.acquire("u")
    assert pool.in_use == 2 and a.queued_s == 0
    a.release()
    a.release()  # idempotent
    b.release()
    assert pool.in_use == 0


async def test_ties_are_served_first_come_first_served() -> None:
    _, pool, _clock = make_pool()
    holder = await pool.acquire("x")
    order: list[str] = []
    tasks = [queue(pool, f"u{i}", order) for i in range(5)]
    await settle()  # all enqueued at the same virtual instant: equal priority
    assert pool.depth == 5
    lease = holder
    for _ in range(5):
        lease.release()
        await settle()
        lease = next(t.result() for t in tasks if t.done() and not t.result().released)
    lease.release()
    assert order == ["u0", "u1", "u2", "u3", "u4"]
    assert pool.in_use == 0


async def test_heavy_user_yields_to_light_user_at_equal_wait() -> None:
    scheduler, pool, _ = make_pool()
    scheduler.usage.add("heavy", 50_000)
    holder = await pool.acquire("x")
    order: list[str] = []
    t1 = queue(pool, "heavy", order)
    await settle()
    t2 = queue(pool, "light", order)
    await settle()
    holder.release()
    await settle()
    assert order == ["light"]
    (await t2).release()
    await settle()
    (await t1).release()
    assert order == ["light", "heavy"]


async def test_waiting_raises_priority_so_nobody_starves() -> None:
    scheduler, pool, clock = make_pool(queue_timeout_s=1000)
    scheduler.usage.add("heavy", 50_000)  # penalty 10*ln(51) ~ 39.3
    holder = await pool.acquire("x")
    order: list[str] = []
    heavy = queue(pool, "heavy", order)
    await settle()
    clock.advance(40)  # heavy has waited 40 s: 100 + 40 - 39.3 > 100
    light = queue(pool, "light", order)
    await settle()
    holder.release()
    await settle()
    assert order == ["heavy"]
    (await heavy).release()
    await settle()
    (await light).release()


async def test_priority_is_recomputed_when_a_slot_frees() -> None:
    scheduler, pool, _clock = make_pool(queue_timeout_s=1000)
    holder = await pool.acquire("x")
    order: list[str] = []
    first = queue(pool, "a", order)
    await settle()
    second = queue(pool, "b", order)
    await settle()
    # After both queued, "a" burns tokens elsewhere: the next pick must see it.
    scheduler.usage.add("a", 100_000)
    holder.release()
    await settle()
    assert order == ["b"]
    (await second).release()
    await settle()
    (await first).release()


async def test_settings_changed_at_runtime_apply_to_the_next_pick() -> None:
    scheduler, pool, _ = make_pool()
    scheduler.usage.add("heavy", 50_000)
    holder = await pool.acquire("x")
    order: list[str] = []
    heavy = queue(pool, "heavy", order)
    await settle()
    light = queue(pool, "light", order)
    await settle()
    scheduler.config = SchedulerConfig(usage_weight=0.0)  # usage no longer counts: FIFO
    holder.release()
    await settle()
    assert order == ["heavy"]
    (await heavy).release()
    await settle()
    (await light).release()


async def test_usage_outside_the_window_is_forgotten() -> None:
    scheduler, _, clock = make_pool(window_minutes=1)
    scheduler.usage.add("u", 500)
    clock.advance(30)
    scheduler.usage.add("u", 700)
    assert scheduler.usage.recent("u", 60) == 1200
    clock.advance(31)
    assert scheduler.usage.recent("u", 60) == 700
    clock.advance(60)
    assert scheduler.usage.recent("u", 60) == 0


async def test_usage_of_a_model_that_never_queues_stays_bounded() -> None:
    # Nothing ever asks for `recent` here; adding alone must forget what left the window.
    scheduler, _, clock = make_pool(window_minutes=1)
    for _ in range(1_000):
        scheduler.usage.add("u", 10)
        clock.advance(1)
    assert len(scheduler.usage._events["u"]) <= 61
    assert scheduler.usage.recent("u", 60) <= 610


async def test_a_busy_users_window_is_kept_in_slices_not_requests() -> None:
    # 100 requests a second for an hour: 360,000 requests, kept as at most ~120 slices.
    scheduler, _, clock = make_pool(window_minutes=60)
    for _ in range(3_600):
        for _ in range(100):
            scheduler.usage.add("busy", 3)
        clock.advance(1)
    assert len(scheduler.usage._events["busy"]) <= UsageWindow.SLICES + 1
    # The last hour's tokens, less at most one slice (30 s) forgotten early.
    recent = scheduler.usage.recent("busy", 3600)
    assert 3_600 * 300 * (1 - 1 / UsageWindow.SLICES) - 300 <= recent <= 3_600 * 300
    clock.advance(3_600)
    assert scheduler.usage.recent("busy", 3600) == 0


async def test_a_freed_slot_cannot_be_taken_by_a_newcomer() -> None:
    _, pool, _ = make_pool()
    holder = await pool.acquire("x")
    order: list[str] = []
    waiter = queue(pool, "waiter", order)
    await settle()
    holder.release()
    # The waiter has not run yet, but the slot is already its own.
    assert pool.in_use == 1 and pool.depth == 0
    newcomer = queue(pool, "newcomer", order)
    await settle()
    assert order == ["waiter"]
    assert not newcomer.done()
    (await waiter).release()
    await settle()
    (await newcomer).release()
    assert pool.in_use == 0


async def test_queue_wait_is_bounded() -> None:
    _, pool, clock = make_pool(queue_timeout_s=30)
    holder = await pool.acquire("x")
    task = asyncio.create_task(pool.acquire("late"))
    await settle()
    clock.advance(29.9)
    await settle()
    assert not task.done()
    clock.advance(0.2)
    await settle()
    with pytest.raises(QueueTimeout) as err:
        await task
    assert err.value.retry_after >= 1
    assert pool.depth == 0 and pool.timed_out == 1
    holder.release()
    assert pool.in_use == 0


async def test_queue_depth_is_bounded() -> None:
    _, pool, _ = make_pool(max_queue=2)
    holder = await pool.acquire("x")
    waiting = [asyncio.create_task(pool.acquire("w")) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as err:
        await pool.acquire("w")
    assert err.value.retry_after >= 1
    holder.release()
    for _task in waiting:
        await settle()
    (await waiting[0]).release()
    await settle()
    (await waiting[1]).release()
    assert pool.in_use == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    _, pool, _ = make_pool()
    holder = await pool.acquire("x")
    task = asyncio.create_task(pool.acquire("gone"))
    await settle()
    assert pool.depth == 1
    task.cancel()
    await settle()
    assert pool.depth == 0
    holder.release()
    assert pool.in_use == 0


async def test_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    _, pool, _ = make_pool()
    holder = await pool.acquire("x")
    order: list[str] = []
    doomed = queue(pool, "doomed", order)
    await settle()
    survivor = queue(pool, "survivor", order)
    await settle()
    holder.release()  # slot handed to "doomed"...
    doomed.cancel()  # ...which is cancelled before it could run
    await settle()
    assert doomed.cancelled()
    assert order == ["survivor"]
    assert pool.in_use == 1
    (await survivor).release()
    assert pool.in_use == 0


class _StaysConnected:
    """A request whose client never leaves."""

    async def receive(self) -> dict[str, str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_slot_granted_as_its_requests_wait_is_cancelled_is_given_back() -> None:
    """The request is cancelled (a caller's time limit, shutdown) after its slot was granted
    but before its wait resumed: the slot is released, not held for good."""
    _, pool, _ = make_pool()
    holder = await pool.acquire("x")
    waiting = asyncio.create_task(wait_for_slot(pool.acquire("w"), _StaysConnected()))  # type: ignore[arg-type]
    await settle()
    holder.release()  # handed to "w"...
    await asyncio.sleep(0)  # ...whose acquire has returned its lease...
    waiting.cancel()  # ...and the wait around it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.in_use == 0
    (await pool.acquire("next", max_wait=0)).release()


async def test_closing_a_pool_fails_its_waiters() -> None:
    scheduler, pool, _ = make_pool()
    holder = await pool.acquire("x")
    task = asyncio.create_task(pool.acquire("w"))
    await settle()
    scheduler.drop("m")
    with pytest.raises(PoolClosed):
        await task
    holder.release()
    with pytest.raises(PoolClosed):
        await pool.acquire("w")


async def test_a_pool_made_again_counts_the_leases_still_running_in_the_dropped_one() -> None:
    scheduler, pool, _ = make_pool()
    running = await pool.acquire("x")
    scheduler.drop("m")  # the model deleted (or its backend stopped) while x runs
    again = scheduler.pool("m", 1)
    assert again.in_use == 1 and again.try_acquire("y") is None
    order: list[str] = []
    task = queue(again, "y", order)
    await settle()
    assert order == []
    running.release()
    await settle()
    assert order == ["y"]
    task.result().release()
    running.release()  # still idempotent: never frees a slot twice
    assert again.in_use == 0 and pool.in_use == 0
    scheduler.drop("m")
    fresh = scheduler.pool("m", 2)
    assert fresh.in_use == 0 and fresh.parallel == 2
    (await fresh.acquire("z")).release()


async def test_growing_a_pool_serves_waiters() -> None:
    scheduler, pool, _ = make_pool()
    holder = await pool.acquire("x")
    task = asyncio.create_task(pool.acquire("w"))
    await settle()
    scheduler.pool("m", 2)
    await settle()
    assert task.done()
    task.result().release()
    holder.release()
    assert pool.in_use == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_stress_random_cancellations_never_leak_or_overcommit(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = Scheduler(SchedulerConfig(max_queue=10_000, queue_timeout_s=0.05))
    pool = scheduler.pool("m", 3)
    outcomes = {"served": 0, "timeout": 0, "cancelled": 0}
    peak = 0

    async def worker(i: int) -> None:
        nonlocal peak
        user = f"u{i % 7}"
        try:
            lease = await pool.acquire(user)
        except QueueTimeout:
            outcomes["timeout"] += 1
            return
        try:
            assert pool.in_use <= pool.parallel
            peak = max(peak, pool.in_use)
            scheduler.usage.add(user, rng.randint(1, 3000))
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001]))
            outcomes["served"] += 1
        finally:
            lease.release()

    tasks = []
    for i in range(3000):
        tasks.append(asyncio.create_task(worker(i)))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
        if rng.random() < 0.2:
            victim = rng.choice(tasks)
            victim.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert not [r for r in results if isinstance(r, Exception)]
    assert sum(outcomes.values()) == 3000, outcomes
    assert outcomes["served"] > 100
    assert peak == 3
    assert pool.in_use == 0
    assert pool.depth == 0
