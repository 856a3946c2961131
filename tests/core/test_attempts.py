"""The per-client attempt limiter behind single sign-on, and the sign-in throttle."""

from __future__ import annotations

import pytest

from legator.core.auth import attempts
from legator.core.auth.attempts import AttemptLimiter, SignInThrottle, client_key
from legator.core.db import Database
from tests.support import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(attempts.time, "monotonic", fake)
    return fake


def test_a_client_gets_its_limit_per_sliding_window(clock: FakeClock) -> None:
    limiter = AttemptLimiter(3, 60)
    assert [limiter.count("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.over("a") and not limiter.over("b")
    assert limiter.count("b")  # others are not affected
    clock.now += 30
    assert not limiter.count("a")
    clock.now += 31  # the first three attempts have left the window
    assert not limiter.over("a")
    assert limiter.count("a")


def test_a_full_table_forgets_the_oldest_client_instead_of_refusing_new_ones(
    clock: FakeClock,
) -> None:
    limiter = AttemptLimiter(2, 60, max_clients=3)
    for client in ("a", "a", "b", "c"):
        assert limiter.count(client)
    assert limiter.over("a")
    assert limiter.count("d")  # a newcomer is counted, not locked out
    assert not limiter.over("a")  # "a", the longest known, was forgotten
    assert not limiter.over("b")


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("not an address") == "not an address"


def _throttle(db: Database, clock: FakeClock, **limits: int) -> SignInThrottle:
    return SignInThrottle(db, b"k" * 32, window_s=60, clock=clock, **limits)


async def test_sign_ins_are_limited_per_account_and_per_address(db: Database) -> None:
    clock = FakeClock()
    throttle = _throttle(db, clock, per_account=3, per_address=5)
    assert [await throttle.admit("192.0.2.1", "alice") for _ in range(4)] == [True] * 3 + [False]
    # The refused fourth did not use the address's allowance: two more accounts fit.
    assert await throttle.admit("192.0.2.1", "bob")
    assert await throttle.admit("192.0.2.1", "carol")
    assert not await throttle.admit("192.0.2.1", "dave")  # five from this address
    assert await throttle.admit("192.0.2.2", "alice")  # another address is not affected
    clock.now += 61
    assert await throttle.admit("192.0.2.1", "dave")


async def test_a_correct_password_forgives_the_account_and_refunds_the_address(
    db: Database,
) -> None:
    throttle = _throttle(db, FakeClock(), per_account=3, per_address=4)
    for _ in range(3):
        assert await throttle.admit("192.0.2.1", "alice")
    await throttle.succeeded("192.0.2.1", "alice")  # the third was right
    assert await throttle.admit("192.0.2.1", "alice")  # alice's failures are forgiven
    assert await throttle.admit("192.0.2.1", "bob")  # the address: two failures, one refund, two
    assert not await throttle.admit("192.0.2.1", "carol")  # and now four


async def test_sign_ins_count_an_ipv6_client_by_its_64(db: Database) -> None:
    throttle = _throttle(db, FakeClock(), per_account=1, per_address=10)
    assert await throttle.admit("2001:db8::1", "alice")
    assert not await throttle.admit("2001:db8::2", "alice")
