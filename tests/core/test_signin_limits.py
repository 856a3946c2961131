"""Password guessing at one account from many addresses is limited per account, without
letting the guessing keep the account's owner out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from legator.core.auth.attempts import SignInThrottle
from legator.core.db import Database
from legator.core.db.migrate import upgrade
from tests.support import FakeClock, LiveServer

PASSWORD = "correct horse battery"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def throttle(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SignInThrottle]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/legator.db")
    await upgrade(db)
    yield SignInThrottle(
        db,
        b"k" * 32,
        per_account=3,
        per_address=100,
        window_s=60,
        per_username=5,
        username_window_s=600,
        known_for_s=3600,
        clock=clock,
    )
    await db.dispose()


async def test_guesses_from_rotating_addresses_are_limited_per_username(
    throttle: SignInThrottle, clock: FakeClock
) -> None:
    admitted = [await throttle.admit(f"198.51.100.{i}", "alice") for i in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    refused = await throttle.refusal("198.51.100.200", "alice")
    assert refused is not None and (refused.whose, refused.retry_after_s) == ("this account", 600)
    assert await throttle.admit("198.51.100.1", "bob")  # other accounts are not affected
    clock.now += 61  # the per-address window is over, the username's is not
    assert not await throttle.admit("198.51.100.201", "alice")
    clock.now += 540  # and now that one is: refusals end, no lock to lift
    assert await throttle.admit("198.51.100.202", "alice")


async def test_an_address_that_signed_in_before_is_not_kept_out(
    throttle: SignInThrottle, clock: FakeClock
) -> None:
    assert await throttle.admit("192.0.2.10", "alice")
    await throttle.succeeded("192.0.2.10", "alice")  # the owner, from home
    for i in range(10):
        await throttle.admit(f"198.51.100.{i}", "alice")
    assert not await throttle.admit("198.51.100.99", "alice")  # a new address waits
    # The owner's address has its own per-account limit only.
    assert [await throttle.admit("192.0.2.10", "alice") for _ in range(4)] == [True] * 3 + [False]
    # The owner's success refunded only its own attempt: the guesser's count stands.
    await throttle.succeeded("192.0.2.10", "alice")
    assert not await throttle.admit("198.51.100.98", "alice")
    clock.now += 3601  # a known address is forgotten after a while, and counts like any
    for i in range(5):
        assert await throttle.admit(f"198.51.100.{100 + i}", "alice")
    assert not await throttle.admit("192.0.2.10", "alice")


async def test_a_sign_in_from_a_new_address_refunds_its_attempt(throttle: SignInThrottle) -> None:
    for i in range(4):
        assert await throttle.admit(f"198.51.100.{i}", "alice")
    assert await throttle.admit("192.0.2.10", "alice")  # the fifth: the owner, right password
    await throttle.succeeded("192.0.2.10", "alice")
    assert await throttle.admit("198.51.100.50", "alice")  # the owner's attempt was given back
    assert not await throttle.admit("198.51.100.51", "alice")


def _sign_in(server: LiveServer, address: str, password: str) -> httpx.Response:
    with server.client() as anon:
        return anon.post(
            "/api/v1/auth/login",
            json={"username": "alice", "password": password},
            headers={"X-Forwarded-For": address},  # the test server trusts loopback proxies
        )


def test_a_guesser_rotating_addresses_is_stopped_and_the_owner_still_gets_in(
    server: LiveServer, make_user
) -> None:
    make_user("viewer", "alice")
    assert _sign_in(server, "192.0.2.10", PASSWORD).status_code == 200
    statuses = [
        _sign_in(server, f"198.51.{i // 250}.{i % 250 + 1}", "wrong guess").status_code
        for i in range(36)
    ]
    assert statuses == [401] * 30 + [429] * 6, statuses  # 30 per username in 15 minutes
    refused = _sign_in(server, "203.0.113.5", PASSWORD)  # right, but from a new address
    assert refused.status_code == 429, refused.text
    assert "for this account" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "900"
    assert _sign_in(server, "192.0.2.10", PASSWORD).status_code == 200
