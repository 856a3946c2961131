"""Counting a client's attempts in a sliding window: single sign-ons started and callbacks
refused in memory (per replica, or, for a limiter shared over the cluster bus, counted by every
replica alike); password sign-ins in the database, so that a restart keeps them and replicas
on one database share them."""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import ScalarSelect

from legator.core.auth.models import SignInCount
from legator.core.db import Database, retention
from legator.core.logging import get_logger
from legator.core.security import hmac_sha256_hex

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
_KEY_CHARS = 32  # 128 bits of the keyed hash
# Core statements on the table, not ORM ones: a third of the time per attempt went to the
# ORM's bulk-statement handling.
_COUNTS = cast(Table, SignInCount.__table__)
_ROW = _COUNTS.c


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


@dataclass(frozen=True)
class _Keys:
    """What one attempt is counted against, as keyed hashes (the rows' ``key``)."""

    address: str
    account: str  # the address and the name
    username: str
    known: str  # the address, once it signed in as the name


class SignInThrottle:
    """Password sign-ins: at most ``per_account`` attempts per address and username (guessing
    one account's password) and ``per_address`` per address over all usernames (trying one
    password on many accounts) in a sliding ``window_s``; and at most ``per_username`` per
    username over all addresses in ``username_window_s`` (one guesser with many addresses).

    That last limit would let a guesser keep an account's owner out for as long as the guessing
    goes on, so it spares an address that signed in to the account within ``known_for_s``:
    such an address has only its own per-account limit. Refusals are bounded by the windows,
    never a lock an administrator has to lift.

    The counts are rows of ``sign_in_counts``, one per attempt and limit, so that a restart
    keeps them and every replica on the database sees them at once. Their keys are HMACs under
    a key derived from the signing key: the table holds no submitted name (people type their
    password there by mistake) and no address, and a copy of the database alone cannot be
    searched for a guessed name. A name that matches no user is counted like any other, so
    the limits cannot tell which names exist.

    An attempt is counted before its password is checked, in one transaction with the check of
    the counts (SQLite's one writer; on PostgreSQL, locks on the address and the name), so
    concurrent guesses cannot all pass together; a correct password forgives its address's
    earlier failures on that account and its own count."""

    def __init__(
        self,
        db: Database,
        key: bytes,
        *,
        per_account: int,
        per_address: int,
        window_s: float,
        per_username: int = SIGN_INS_PER_USERNAME,
        username_window_s: float = USERNAME_WINDOW_S,
        known_for_s: float = KNOWN_ADDRESS_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self._key = bytes.fromhex(hmac_sha256_hex(key, "legator sign-in counts|v1"))
        self.per_account = per_account
        self.per_address = per_address
        self.window_s = window_s
        self.per_username = per_username
        self.username_window_s = username_window_s
        self.known_for_s = known_for_s
        self._clock = clock

    def _keys(self, client_ip: str, username: str) -> _Keys:
        address = client_key(client_ip)

        def digest(*parts: str) -> str:
            return hmac_sha256_hex(self._key, "\0".join(parts))[:_KEY_CHARS]

        return _Keys(
            address=digest("address", address),
            account=digest("account", address, username),
            username=digest("username", username),
            known=digest("known", address, username),
        )

    def _at(self, now: float, after_s: float = 0.0) -> datetime:
        return datetime.fromtimestamp(now + after_s, UTC)

    async def refusal(self, client_ip: str, username: str) -> Refusal | None:
        """Count an attempt; or, when a limit is used up, count nothing and say which."""
        keys = self._keys(client_ip, username)
        now = self._clock()
        # A read first: a flood of attempts already refused must not queue for the writer.
        async with self.db.session() as session:
            used = await self._used(await session.connection(), keys, now)
        if refused := self._refused(keys, used, known=used[keys.known] > 0):
            return refused
        async with self.db.write() as session:
            connection = await session.connection()
            await self._take_turns(connection, keys)
            used = await self._used(connection, keys, now)
            known = used[keys.known] > 0
            refused = self._refused(keys, used, known=known)
            if refused is None:
                await self._count(connection, keys, now, known=known)
        return refused

    async def admit(self, client_ip: str, username: str) -> bool:
        """Count an attempt; False (and not counted) when a limit is used up."""
        return await self.refusal(client_ip, username) is None

    async def succeeded(self, client_ip: str, username: str) -> None:
        keys = self._keys(client_ip, username)
        now = self._clock()
        async with self.db.write() as session:
            connection = await session.connection()
            await self._take_turns(connection, keys)
            known = (await self._used(connection, keys, now))[keys.known] > 0
            # The address's attempt is given back; so is the username's, which only unknown
            # addresses' attempts count. The others stay counted: the owner signing in must
            # not reset a guesser's count.
            refunds = [keys.address] if known else [keys.address, keys.username]
            latest = [self._latest(key, now) for key in refunds]
            forgiven = _ROW.key.in_((keys.account, keys.known)) | _ROW.id.in_(latest)
            await connection.execute(delete(_COUNTS).where(forgiven))
            # Known from now for known_for_s: "signed in within the last known_for_s".
            until = self._at(now, self.known_for_s)
            await connection.execute(insert(_COUNTS).values(key=keys.known, expires_at=until))

    async def account_attempts(self, client_ip: str, username: str) -> int:
        """How many attempts at ``username`` from ``client_ip`` count now."""
        keys = self._keys(client_ip, username)
        async with self.db.session() as session:
            connection = await session.connection()
            return (await self._used(connection, keys, self._clock()))[keys.account]

    def _refused(self, keys: _Keys, used: dict[str, int], *, known: bool) -> Refusal | None:
        if used[keys.address] >= self.per_address or used[keys.account] >= self.per_account:
            return Refusal("this address", self.window_s)
        if not known and used[keys.username] >= self.per_username:
            return Refusal("this account", self.username_window_s)
        return None

    async def _take_turns(self, connection: AsyncConnection, keys: _Keys) -> None:
        """On PostgreSQL, one attempt at a time per address and per name, over all replicas
        (SQLite's BEGIN IMMEDIATE already lets one writer in). Always the address first, so
        that two attempts never wait on each other's lock."""
        if self.db.is_sqlite:
            return
        for name in (keys.address, keys.username):
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
                {"name": f"legator:sign-in:{name}"},
            )

    async def _used(self, connection: AsyncConnection, keys: _Keys, now: float) -> dict[str, int]:
        wanted = (keys.address, keys.account, keys.username, keys.known)
        query = (
            select(_ROW.key, func.count())
            .where(_ROW.key.in_(wanted), _ROW.expires_at > self._at(now))
            .group_by(_ROW.key)
        )
        counts = {key: int(n) for key, n in (await connection.execute(query)).all()}
        return {key: counts.get(key, 0) for key in wanted}

    async def _count(
        self, connection: AsyncConnection, keys: _Keys, now: float, *, known: bool
    ) -> None:
        short = self._at(now, self.window_s)
        rows = [
            {"key": keys.account, "expires_at": short},
            {"key": keys.address, "expires_at": short},
        ]
        if not known:
            rows.append({"key": keys.username, "expires_at": self._at(now, self.username_window_s)})
        await connection.execute(insert(_COUNTS), rows)

    def _latest(self, key: str, now: float) -> ScalarSelect[int]:
        """The latest attempt counted against ``key``."""
        return (
            select(_ROW.id)
            .where(_ROW.key == key, _ROW.expires_at > self._at(now))
            .order_by(_ROW.expires_at.desc(), _ROW.id.desc())
            .limit(1)
            .scalar_subquery()
        )

    async def prune(self) -> int:
        """Delete the rows past their window (AuthService's housekeeping, every 30 s); returns
        how many went."""
        before = self._at(self._clock())
        return await retention.prune(self.db, SignInCount.id, SignInCount.expires_at, before)
