"""The fair scheduler: per-model slot pools with a priority queue.

priority = base + wait_weight * wait_s - usage_weight * ln(1 + recent_tokens / usage_scale)

Priorities are recomputed each time a slot frees (so waiting raises a request's priority and
nobody starves); ties go to the earliest arrival; a freed slot is handed straight to the chosen
waiter, so a newcomer can never take it while someone waits (no barging); a waiter that times
out or is cancelled leaves the queue, and a slot handed to a waiter that was cancelled at the
same moment is passed on at once (no lost wake-ups, no leaks).

Hand-written rather than built on ``asyncio.Semaphore``/``PriorityQueue``: those wake waiters in
FIFO order or by a priority fixed at enqueue time, and neither hands a slot over directly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SchedulerConfig:
    base: float = 100.0
    wait_weight: float = 1.0
    usage_weight: float = 10.0
    usage_scale: float = 1000.0
    window_minutes: float = 60.0
    max_queue: int = 256
    queue_timeout_s: float = 30.0


class QueueFull(Exception):
    def __init__(self, model: str, depth: int, retry_after: int) -> None:
        super().__init__(f"the queue for model {model!r} is full ({depth} waiting)")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    def __init__(self, model: str, waited: float, retry_after: int) -> None:
        super().__init__(f"no slot of model {model!r} became free within {waited:.0f} s")
        self.retry_after = retry_after


class PoolClosed(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is no longer being served")


class TimerHandle(Protocol):
    def cancel(self) -> Any: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)


class UsageWindow:
    """Each user's tokens over the last ``window_s()`` seconds, kept per user as a deque of
    (start, tokens) slices, each ``window_s() / SLICES`` long at most.

    Slices keep memory bounded by users, not requests: an hour of a busy gateway is hundreds of
    thousands of requests, and the window may be a week. A slice leaves the window whole, when
    its start does, so tokens are forgotten up to one slice (under 1 % of the window) early.
    Adding prunes that user's expired slices too, so a model that never queues (and so never
    asks for ``recent``) keeps nothing past the window.
    """

    SLICES = 120

    def __init__(self, clock: Clock, window_s: Callable[[], float] = lambda: 3600.0) -> None:
        self.clock = clock
        self.window_s = window_s
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._totals: dict[str, int] = {}

    def add(self, user: str, tokens: int, at: float | None = None) -> None:
        if tokens <= 0:
            return
        now = self.clock.now() if at is None else at
        window_s = self.window_s()
        events = self._events.setdefault(user, deque())
        if events and 0 <= now - events[-1][0] < window_s / self.SLICES:
            start, earlier = events[-1]
            events[-1] = (start, earlier + tokens)
        else:
            events.append((now, tokens))
        self._totals[user] = self._totals.get(user, 0) + tokens
        self._expire(user, events, window_s)

    def clear(self) -> None:
        self._events.clear()
        self._totals.clear()

    def recent(self, user: str, window_s: float) -> int:
        events = self._events.get(user)
        if not events:
            return 0
        self._expire(user, events, window_s)
        return self._totals.get(user, 0)

    def _expire(self, user: str, events: deque[tuple[float, int]], window_s: float) -> None:
        horizon = self.clock.now() - window_s
        while events and events[0][0] < horizon:
            _, tokens = events.popleft()
            self._totals[user] -= tokens
        if not events:
            del self._events[user]
            self._totals.pop(user, None)


def priority(config: SchedulerConfig, wait_s: float, recent_tokens: int) -> float:
    return (
        config.base
        + config.wait_weight * wait_s
        - config.usage_weight * math.log1p(recent_tokens / config.usage_scale)
    )


@dataclass(eq=False)
class Waiter:
    user: str
    enqueued_at: float
    seq: int
    future: asyncio.Future[None]
    timer: TimerHandle | None = None


@dataclass
class Lease:
    """One held slot. ``release()`` is idempotent; whoever holds a lease must call it."""

    pool: SlotPool
    user: str
    queued_s: float
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release()

    @property
    def released(self) -> bool:
        return self._released


class SlotPool:
    """``parallel`` slots of one model and the queue of requests waiting for them."""

    def __init__(
        self,
        model: str,
        parallel: int,
        *,
        config: Callable[[], SchedulerConfig],
        usage: UsageWindow,
        clock: Clock,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.model = model
        self.parallel = parallel
        self.in_use = 0
        self._config = config
        self.usage = usage
        self.clock = clock
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()
        self._closed = False
        self.served = 0
        self.timed_out = 0
        self.rejected = 0
        self.last_wait_s = 0.0

    @property
    def depth(self) -> int:
        return len(self._waiters)

    def oldest_wait(self) -> float:
        if not self._waiters:
            return 0.0
        return self.clock.now() - min(w.enqueued_at for w in self._waiters)

    def _retry_after(self, config: SchedulerConfig) -> int:
        return max(1, min(int(config.queue_timeout_s), 1 + self.depth // self.parallel))

    def try_acquire(self, user: str) -> Lease | None:
        """A slot at once if one is free and nobody waits for it, else None."""
        if self._closed:
            raise PoolClosed(self.model)
        if self.in_use < self.parallel and not self._waiters:
            self.in_use += 1
            self.served += 1
            self.last_wait_s = 0.0
            return Lease(self, user, 0.0)
        return None

    async def acquire(self, user: str, *, max_wait: float | None = None) -> Lease:
        lease = self.try_acquire(user)
        if lease is not None:
            return lease
        config = self._config()
        start = self.clock.now()
        if len(self._waiters) >= config.max_queue:
            self.rejected += 1
            raise QueueFull(self.model, len(self._waiters), self._retry_after(config))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(user, start, next(self._seq), future)
        limit = config.queue_timeout_s if max_wait is None else max_wait
        waiter.timer = self.clock.call_later(limit, lambda: self._expire(waiter))
        self._waiters.append(waiter)
        try:
            await future
        except BaseException:
            if waiter.timer is not None:
                waiter.timer.cancel()
            if future.done() and not future.cancelled() and future.exception() is None:
                # The slot was handed over just as we were cancelled: pass it on.
                self._release()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if waiter.timer is not None:
            waiter.timer.cancel()
        waited = self.clock.now() - start
        self.last_wait_s = waited
        return Lease(self, user, waited)

    def _expire(self, waiter: Waiter) -> None:
        if waiter in self._waiters and not waiter.future.done():
            self._waiters.remove(waiter)
            self.timed_out += 1
            config = self._config()
            waiter.future.set_exception(
                QueueTimeout(
                    self.model, self.clock.now() - waiter.enqueued_at, self._retry_after(config)
                )
            )

    def _pick(self) -> Waiter | None:
        config = self._config()
        now = self.clock.now()
        best: tuple[float, int] | None = None
        chosen: Waiter | None = None
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            prio = priority(
                config,
                now - waiter.enqueued_at,
                self.usage.recent(waiter.user, config.window_minutes * 60),
            )
            key = (-prio, waiter.seq)  # highest priority first, then first come
            if best is None or key < best:
                best, chosen = key, waiter
        return chosen

    def _release(self) -> None:
        self.in_use -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_use < self.parallel and self._waiters:
            waiter = self._pick()
            if waiter is None:
                self._waiters.clear()
                return
            self._waiters.remove(waiter)
            self.in_use += 1
            self.served += 1
            waiter.future.set_result(None)

    def resize(self, parallel: int) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.parallel = parallel
        self._dispatch()

    def reopen(self, parallel: int) -> None:
        """Serve again after ``close()``, the leases still held counting against ``parallel``."""
        self._closed = False
        self.resize(parallel)

    def close(self) -> None:
        """Stop serving: every waiter gets PoolClosed; held leases still release normally."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.future.done():
                if waiter.timer is not None:
                    waiter.timer.cancel()
                waiter.future.set_exception(PoolClosed(self.model))
        self._waiters.clear()


class Scheduler:
    """All pools, one shared usage window, one runtime-editable configuration."""

    def __init__(self, config: SchedulerConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.clock = clock or LoopClock()
        self.usage = UsageWindow(self.clock, lambda: self.config.window_minutes * 60)
        self.pools: dict[str, SlotPool] = {}
        # Dropped pools whose leases were still running at the time: their requests still
        # occupy the backend, so a pool made again for the model reopens one of these.
        self._draining: dict[str, SlotPool] = {}

    def pool(self, model: str, parallel: int) -> SlotPool:
        pool = self.pools.get(model)
        if pool is None:
            pool = self._draining.pop(model, None)
            if pool is not None:
                pool.reopen(parallel)
            else:
                pool = SlotPool(
                    model, parallel, config=lambda: self.config, usage=self.usage, clock=self.clock
                )
            self.pools[model] = pool
        elif pool.parallel != parallel:
            pool.resize(parallel)
        return pool

    def drop(self, model: str) -> None:
        pool = self.pools.pop(model, None)
        if pool is not None:
            pool.close()
            self._draining[model] = pool
        self._draining = {m: p for m, p in self._draining.items() if p.in_use}


class VirtualClock:
    """A clock that moves only when told to: for tests and simulations."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _VirtualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _VirtualTimer(callback)
        heapq.heappush(self._timers, (self._now + delay, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = when
            if not timer.cancelled:
                timer.callback()
        self._now = target


class _VirtualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
