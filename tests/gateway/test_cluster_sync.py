"""GatewaySync on its own: which messages it takes, how reloads coalesce and retry. The bus
is a stand-in recording what would be broadcast; the two-replica behaviour over real NATS
and PostgreSQL is in test_replicas.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from legator.gateway import cluster
from legator.gateway.cluster import GatewaySync, Part


class Link:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.receive: Callable[[str, dict[str, Any]], None] | None = None
        self.state: Callable[[bool], None] | None = None

    def on_broadcast(self, kind: str, handler: Callable[[str, dict[str, Any]], None]) -> None:
        assert kind == "gateway"
        self.receive = handler

    def on_state(self, hook: Callable[[bool], None]) -> None:
        self.state = hook

    def broadcast(self, kind: str, body: dict[str, Any]) -> None:
        self.sent.append(body)


def make(
    reload: Callable[[Part], Any], on_usage: Callable[[dict[str, int]], None] | None = None
) -> tuple[GatewaySync, Link]:
    link = Link()
    return GatewaySync(link, reload, on_usage), link  # type: ignore[arg-type]


async def settle(sync: GatewaySync) -> None:
    while sync._task is not None and not sync._task.done():
        await asyncio.sleep(0.01)


async def test_changes_are_announced_and_coalesced() -> None:
    reloaded: list[str] = []

    async def reload(part: Part) -> None:
        reloaded.append(part)
        await asyncio.sleep(0.05)

    sync, link = make(reload)
    sync.changed("settings")
    assert link.sent == [{"parts": ["settings"]}]
    assert link.receive is not None
    link.receive("replica-b", {"parts": ["catalog"]})
    await asyncio.sleep(0.01)
    for _ in range(5):  # while the catalogue is read, more news of it: read once more
        link.receive("replica-b", {"parts": ["catalog", "reservations"]})
    await settle(sync)
    assert reloaded == ["catalog", "catalog", "reservations"]
    await sync.close()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"parts": "catalog"},
        {"parts": []},
        {"parts": ["catalog", "secrets"]},
        {"parts": [1]},
        {"parts": [{}]},
    ],
)
async def test_malformed_messages_are_ignored(body: dict[str, Any]) -> None:
    reloaded: list[str] = []

    async def reload(part: Part) -> None:
        reloaded.append(part)

    sync, link = make(reload)
    assert link.receive is not None
    link.receive("replica-x", body)
    await settle(sync)
    assert reloaded == [] and sync._task is None


async def test_a_reconnection_reads_everything_and_asks_the_others_to() -> None:
    reloaded: list[str] = []

    async def reload(part: Part) -> None:
        reloaded.append(part)

    sync, link = make(reload)
    assert link.state is not None
    link.state(False)
    assert link.sent == [] and sync._task is None
    link.state(True)
    await settle(sync)
    assert sorted(reloaded) == ["catalog", "reservations", "settings", "usage"]
    assert link.sent == [
        {"parts": ["catalog", "reservations", "settings"]},
        {"parts": ["usage"]},  # apart: a replica that knows no such part drops only this
    ]


async def test_the_periodic_read_leaves_usage_to_the_announcements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster, "RESYNC_INTERVAL_S", 0.02)
    reloaded: list[str] = []

    async def reload(part: Part) -> None:
        reloaded.append(part)

    sync, _link = make(reload)
    runner = asyncio.ensure_future(sync.run())
    while len(reloaded) < 6:
        await asyncio.sleep(0.01)
    runner.cancel()
    await sync.close()
    assert set(reloaded) == {"catalog", "reservations", "settings"}


async def test_usage_is_announced_and_counted() -> None:
    counted: list[dict[str, int]] = []

    async def reload(part: Part) -> None:
        raise AssertionError("usage is counted, not read again")

    sync, link = make(reload, counted.append)
    sync.used({})
    assert link.sent == []
    sync.used({"u1": 12, "u2": 3})
    assert link.sent == [{"usage": {"u1": 12, "u2": 3}}]
    assert link.receive is not None
    link.receive("replica-b", {"usage": {"u3": 40}})
    assert counted == [{"u3": 40}]
    assert sync._task is None


@pytest.mark.parametrize(
    "usage",
    [None, [], "u1", {"u1": "12"}, {"u1": 1.5}, {"u1": True}, {"u1": 0}, {"u1": -5}, {"u1": None}],
)
async def test_malformed_usage_is_ignored(usage: Any) -> None:
    counted: list[dict[str, int]] = []

    async def reload(part: Part) -> None:
        raise AssertionError("not a part")

    sync, link = make(reload, counted.append)
    assert link.receive is not None
    link.receive("replica-x", {"usage": usage})
    await settle(sync)
    assert counted == [] and sync._task is None


async def test_a_failed_reload_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "RETRY_S", 0.01)
    attempts: list[str] = []

    async def reload(part: Part) -> None:
        attempts.append(part)
        if len(attempts) < 3:
            raise ConnectionError("database away")

    sync, link = make(reload)
    assert link.receive is not None
    link.receive("replica-b", {"parts": ["settings"]})
    await settle(sync)
    assert attempts == ["settings"] * 3
