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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RATE_ENV, BURST_ENV = "LEGERD_RATE_LIMIT", "LEGERD_RATE_BURST"
MAX_SOURCES = 10_000  # buckets kept before idle ones are dropped


@dataclass(frozen=True)
class RateLimit:
    per_second: float = 50.0  # 0: no limit
    burst: int = 1000  # calls a source may make at once, e.g. a host starting its services

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
    """Only ever called from the event loop's thread, so it needs no lock."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source: (tokens, at)

    def wait(self, source: str) -> float:
        """0 when ``source`` may make a call now (and takes its token), else the seconds
        until it may."""
        rate, burst = self.limit.per_second, self.limit.burst
        if not rate:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(source, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if tokens >= 1:
            self._buckets[source] = (tokens - 1, now)
            if len(self._buckets) > MAX_SOURCES:
                self._forget_idle(now)
            return 0.0
        self._buckets[source] = (tokens, now)
        return (1 - tokens) / rate

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes nothing."""
        refill = self.limit.burst / self.limit.per_second
        self._buckets = {s: b for s, b in self._buckets.items() if now - b[1] < refill}
