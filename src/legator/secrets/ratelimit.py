"""A request-rate limit per source: a token bucket per peer address (TCP) or uid (socket).

Every call legerd answers writes an audit line, a denied one included: without a limit, any
node that can reach it fills the audit log (and, rotated, pushes out everyone else's lines) at
the rate it can ask. The source is known before the caller is identified, so a throttled request
costs neither a tailscaled ``whois`` nor a line of any log.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RATE_ENV, BURST_ENV = "LEGERD_RATE_LIMIT", "LEGERD_RATE_BURST"
MAX_SOURCES = 10_000  # buckets kept at most: the sources in use at once


@dataclass(frozen=True)
class RateLimit:
    per_second: float = 50.0  # 0: no limit
    burst: int = 1000  # calls a source may make at once, e.g. a host starting its services
    max_sources: int = MAX_SOURCES  # sources counted at once; a new one beyond is refused

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, *, dev: bool = False) -> RateLimit:
        """Raises ValueError naming the variable for a bad value. ``dev``: no limit unless
        one is set (a loopback-only daemon for one developer, and what the benchmarks run)."""
        limit = cls(per_second=0.0) if dev else cls()
        per_second, burst = limit.per_second, limit.burst
        if RATE_ENV in env:
            per_second = _number(RATE_ENV, env[RATE_ENV])
        if BURST_ENV in env:
            text = env[BURST_ENV].strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{BURST_ENV}={env[BURST_ENV]!r}: expected an integer >= 1")
            burst = int(text)
        return cls(per_second, burst)


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key}={text!r}: expected a non-negative number (0: no limit)")
    return value


class Limiter:
    """A token bucket per source, at most ``limit.max_sources`` of them. A bucket that has had time
    to refill is dropped (it is the same as none) before a new source would pass the bound;
    when every bucket is in use, a new source is refused, as if throttled, until the oldest
    one refills: the table never grows beyond the bound, whatever the number of sources.

    The buckets are kept in the order they were last used, so the ones that may be dropped
    are found at the front, without a scan. Only ever called from the event loop's thread,
    so it needs no lock."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def tracks(self, source: str) -> bool:
        return source in self._buckets

    def wait(self, source: str) -> float:
        """0 when ``source`` may make a call now (and takes its token), else the seconds
        until it may."""
        rate, burst = self.limit.per_second, self.limit.burst
        if not rate:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if room := self._wait_for_room(now):
                return room
            bucket = (float(burst), now)
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
        taken = tokens >= 1
        self._buckets[source] = (tokens - 1 if taken else tokens, now)
        self._buckets.move_to_end(source)
        return 0.0 if taken else (1 - tokens) / rate

    def _wait_for_room(self, now: float) -> float:
        """Drop the buckets that have surely refilled, oldest first; 0 when a new source
        fits, else the seconds until the oldest bucket has refilled."""
        refill = self.limit.burst / self.limit.per_second
        while self._buckets:
            idle = now - next(iter(self._buckets.values()))[1]
            if idle < refill:
                return 0.0 if len(self._buckets) < self.limit.max_sources else refill - idle
            self._buckets.popitem(last=False)
        return 0.0
