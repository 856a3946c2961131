"""The per-client attempt limiter behind single sign-on."""

from __future__ import annotations

import pytest

from legator.core.auth import attempts
from legator.core.auth.attempts import AttemptLimiter, client_key


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(attempts.time, "monotonic", fake)
    return fake


def test_a_client_gets_its_limit_per_sliding_window(clock: _Clock) -> None:
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
    clock: _Clock,
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
