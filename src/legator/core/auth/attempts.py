"""Counting a client's attempts (password sign-ins, single sign-ons started, callbacks
refused) in memory, per replica, in a sliding window."""

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

    def refund(self, client: str) -> None:
        """Take back ``client``'s latest attempt (one that turned out to be legitimate)."""
        times = self._seen.get(client)
        if times:
            times.pop()

    def forget(self, client: str) -> None:
        self._seen.pop(client, None)

    def clear(self) -> None:
        self._seen.clear()


class SignInThrottle:
    """Password sign-ins: at most ``per_account`` attempts per address and username (guessing
    one account's password) and ``per_address`` per address over all usernames (trying one
    password on many accounts) in a sliding ``window_s``. An attempt is counted before its
    password is checked, so concurrent guesses cannot all pass the check together; a correct
    password forgives its address's earlier failures on that account and its own count."""

    def __init__(self, *, per_account: int, per_address: int, window_s: float) -> None:
        self.window_s = window_s
        self._accounts = AttemptLimiter(per_account, window_s)
        self._addresses = AttemptLimiter(per_address, window_s)

    def admit(self, client_ip: str, username: str) -> bool:
        """Count an attempt; False (and not counted) when either limit is used up."""
        address = client_key(client_ip)
        account = f"{address}|{username}"
        if self._addresses.over(address) or not self._accounts.count(account):
            return False
        self._addresses.count(address)
        return True

    def succeeded(self, client_ip: str, username: str) -> None:
        address = client_key(client_ip)
        self._accounts.forget(f"{address}|{username}")
        self._addresses.refund(address)
