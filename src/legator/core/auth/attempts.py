"""Counting a client's attempts (password sign-ins, single sign-ons started, callbacks
refused) in memory, in a sliding window: per replica, or, for a limiter shared over the
cluster bus, counted by every replica alike."""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from legator.core.logging import get_logger

if TYPE_CHECKING:
    from legator.core.cluster import ClusterLink

log = get_logger("legator.core.auth.attempts")
# What one replica tells the others it did to a shared limiter's count of a client.
_OPERATIONS = frozenset({"count", "refund", "forget"})
_MAX_CLIENT_CHARS = 400  # an address and a username, with room
# Guesses at one account over all addresses (a guesser with many), per longer window: about
# 2,900 a day at most. Addresses that signed in to the account within KNOWN_ADDRESS_S are
# spared, so that guessing cannot keep the account's owner out.
SIGN_INS_PER_USERNAME = 30
USERNAME_WINDOW_S = 900.0
KNOWN_ADDRESS_S = 30 * 86400.0


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
        self._tell: Callable[[str, str], None] | None = None  # set by share()

    def share(self, cluster: ClusterLink, name: str) -> None:
        """Count, refund and forget on every replica of the cluster alike, so that N replicas
        behind a balancer allow ``limit`` attempts in all, not N times ``limit``. A message lost
        on the bus (it delivers at most once) leaves one attempt uncounted elsewhere."""
        kind = f"attempts.{name}"

        def tell(operation: str, client: str) -> None:
            cluster.broadcast(kind, {"op": operation, "client": client})

        def heard(_origin: str, body: dict[str, Any]) -> None:
            operation, client = body.get("op"), body.get("client")
            if operation not in _OPERATIONS or not isinstance(client, str):
                log.warning("unusable attempt message ignored", limiter=name)
                return
            if len(client) <= _MAX_CLIENT_CHARS:
                self._apply(str(operation), client)

        self._tell = tell
        cluster.on_broadcast(kind, heard)

    def _apply(self, operation: str, client: str) -> None:
        """What another replica did: an attempt it counted is counted here too, even past
        the limit (it was admitted there)."""
        if operation == "count":
            now = time.monotonic()
            self._times(client, now).append(now)
        elif operation == "refund":
            self._refund(client)
        else:
            self._seen.pop(client, None)

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._seen.get(client)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def used(self, client: str) -> int:
        """How many attempts ``client`` made in the window."""
        times = self._recent(client, time.monotonic())
        return len(times) if times is not None else 0

    def over(self, client: str) -> bool:
        """Whether ``client`` has used up its attempts."""
        return self.used(client) >= self.limit

    def _times(self, client: str, now: float) -> deque[float]:
        times = self._recent(client, now)
        if times is None:
            if len(self._seen) >= self.max_clients:
                cutoff = now - self.window_s
                for stale in [c for c, t in self._seen.items() if not t or t[-1] <= cutoff]:
                    del self._seen[stale]
                if len(self._seen) >= self.max_clients:
                    del self._seen[next(iter(self._seen))]
            times = self._seen[client] = deque()
        return times

    def count(self, client: str) -> bool:
        """Count an attempt; False (and not counted) when ``client`` is over the limit."""
        now = time.monotonic()
        times = self._times(client, now)
        if len(times) >= self.limit:
            return False
        times.append(now)
        if self._tell is not None:
            self._tell("count", client)
        return True

    def _refund(self, client: str) -> None:
        times = self._seen.get(client)
        if times:
            times.pop()

    def refund(self, client: str) -> None:
        """Take back ``client``'s latest attempt (one that turned out to be legitimate)."""
        self._refund(client)
        if self._tell is not None:
            self._tell("refund", client)

    def forget(self, client: str) -> None:
        self._seen.pop(client, None)
        if self._tell is not None:
            self._tell("forget", client)

    def clear(self) -> None:
        self._seen.clear()


@dataclass(frozen=True)
class Refusal:
    """A sign-in refused: whose limit was used up, and for how long at most."""

    whose: str
    retry_after_s: float


class SignInThrottle:
    """Password sign-ins: at most ``per_account`` attempts per address and username (guessing
    one account's password) and ``per_address`` per address over all usernames (trying one
    password on many accounts) in a sliding ``window_s``; and at most ``per_username`` per
    username over all addresses in ``username_window_s`` (one guesser with many addresses).

    That last limit would let a guesser keep an account's owner out for as long as the guessing
    goes on, so it spares an address that signed in to the account before (within
    ``known_for_s``): such an address has only its own per-account limit. Refusals are bounded
    by the windows, never a lock an administrator has to lift.

    An attempt is counted before its password is checked, so concurrent guesses cannot all pass
    the check together; a correct password forgives its address's earlier failures on that
    account and its own count."""

    def __init__(
        self,
        *,
        per_account: int,
        per_address: int,
        window_s: float,
        per_username: int = SIGN_INS_PER_USERNAME,
        username_window_s: float = USERNAME_WINDOW_S,
        known_for_s: float = KNOWN_ADDRESS_S,
    ) -> None:
        self.window_s = window_s
        self.username_window_s = username_window_s
        self._accounts = AttemptLimiter(per_account, window_s)
        self._addresses = AttemptLimiter(per_address, window_s)
        # Roomier: a guesser could otherwise try this many other names to push an account's
        # count out of the table, then guess at it afresh.
        self._usernames = AttemptLimiter(per_username, username_window_s, max_clients=100_000)
        # A limit of one: an address|username pair counted once is known for known_for_s.
        self._known = AttemptLimiter(1, known_for_s)

    def share(self, cluster: ClusterLink) -> None:
        """Count sign-ins on every replica alike (``AttemptLimiter.share``)."""
        self._accounts.share(cluster, "sign-in-account")
        self._addresses.share(cluster, "sign-in-address")
        self._usernames.share(cluster, "sign-in-username")
        self._known.share(cluster, "sign-in-known")

    def refusal(self, client_ip: str, username: str) -> Refusal | None:
        """Count an attempt; or, when a limit is used up, count nothing and say which."""
        address = client_key(client_ip)
        account = f"{address}|{username}"
        if self._addresses.over(address) or self._accounts.over(account):
            return Refusal("this address", self.window_s)
        if not self._known.over(account) and not self._usernames.count(username):
            return Refusal("this account", self.username_window_s)
        self._accounts.count(account)
        self._addresses.count(address)
        return None

    def admit(self, client_ip: str, username: str) -> bool:
        """Count an attempt; False (and not counted) when a limit is used up."""
        return self.refusal(client_ip, username) is None

    def succeeded(self, client_ip: str, username: str) -> None:
        address = client_key(client_ip)
        account = f"{address}|{username}"
        self._accounts.forget(account)
        self._addresses.refund(address)
        if not self._known.over(account):
            # This attempt counted against the username (unknown addresses' attempts do);
            # the others stay counted: the owner signing in must not reset a guesser's count.
            self._usernames.refund(username)
            self._known.count(account)
