"""Counting a client's attempts (single sign-ons started, callbacks refused) in memory, per
replica, in a sliding window."""

from __future__ import annotations

import ipaddress
import time
from collections import deque


def client_key(client_ip: str) -> str:
    """Whom to count attempts against: the address, or its /64 for IPv6 (one machine
    commonly holds a whole /64)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AttemptLimiter:
    """At most ``limit`` attempts per client in a sliding ``window_s``, kept in memory (per
    replica) for at most ``max_clients`` clients: past that, the longest-known client is
    forgotten. Refusing new clients instead would let anyone with enough addresses lock
    everyone else out; forgetting only resets someone's count."""

    def __init__(self, limit: int, window_s: float, *, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._seen: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._seen.get(client)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def over(self, client: str) -> bool:
        """Whether ``client`` has used up its attempts."""
        times = self._recent(client, time.monotonic())
        return times is not None and len(times) >= self.limit

    def count(self, client: str) -> bool:
        """Count an attempt; False (and not counted) when ``client`` is over the limit."""
        now = time.monotonic()
        times = self._recent(client, now)
        if times is None:
            if len(self._seen) >= self.max_clients:
                cutoff = now - self.window_s
                for stale in [c for c, t in self._seen.items() if not t or t[-1] <= cutoff]:
                    del self._seen[stale]
                if len(self._seen) >= self.max_clients:
                    del self._seen[next(iter(self._seen))]
            times = self._seen[client] = deque()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True

    def clear(self) -> None:
        self._seen.clear()
