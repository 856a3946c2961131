"""Which replica serves a model: the same choice on every replica, and only among the live."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from legator.gateway import homes
from legator.gateway.homes import EXPIRE_S, Home, Homes


class _Link:
    """What Homes uses of the cluster bus, with the messages it sends kept."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.connected = True
        self.sent: list[dict[str, Any]] = []
        self.handler: Any = None
        self.state_hook: Any = None

    def on_broadcast(self, _kind: str, handler: Any) -> None:
        self.handler = handler

    def on_state(self, hook: Any) -> None:
        self.state_hook = hook

    def broadcast(self, _kind: str, body: dict[str, Any]) -> None:
        self.sent.append(body)


def _cluster(names: list[str]) -> dict[str, Homes]:
    links = {name: _Link(name) for name in names}
    members = {name: Homes(link, f"http://{name}:8080") for name, link in links.items()}  # type: ignore[arg-type]
    for name in links:
        for other, other_link in links.items():
            if other != name:
                other_link.handler(name, {"url": f"http://{name}:8080"})
    # Each replica answered the first beat it heard from another with one of its own.
    assert all(len(link.sent) == len(names) - 1 for link in links.values())
    return members


def test_every_replica_picks_the_same_home_for_each_model() -> None:
    members = _cluster(["cp-1", "cp-2", "cp-3"])
    for model in (f"model-{i}" for i in range(50)):
        homes_seen = {
            name: (member.home_of(model) or Home(name, f"http://{name}:8080"))
            for name, member in members.items()
        }
        assert len(set(homes_seen.values())) == 1, homes_seen
    # Spread over all three (50 models: each gets some).
    counts = {name: 0 for name in members}
    for i in range(50):
        home = members["cp-1"].home_of(f"model-{i}")
        counts[home.replica if home else "cp-1"] += 1
    assert all(count > 5 for count in counts.values()), counts


def test_only_live_replicas_with_a_valid_url_are_homes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(homes.time, "monotonic", lambda: now[0])
    link = _Link("cp-1")
    member = Homes(link, "http://cp-1:8080")  # type: ignore[arg-type]
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    moved = [m for m in (f"m{i}" for i in range(40)) if member.home_of(m) is not None]
    assert moved and all(member.home_of(m) == Home("cp-2", "http://cp-2:8080") for m in moved)
    now[0] += EXPIRE_S + 1  # cp-2 stopped beating
    assert all(member.home_of(m) is None for m in moved)
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    assert member.home_of(moved[0]) is not None
    link.handler("cp-2", {"leaving": True})
    assert member.home_of(moved[0]) is None
    for bad in ({"url": "ftp://cp-3"}, {"url": 5}, {"url": "http://" + "x" * 600}, {}):
        link.handler("cp-3", bad)
    assert member._peers == {}
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    link.state_hook(False)  # cut off from the bus: serve everything here
    assert member.home_of(moved[0]) is None
    link.connected = False
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    assert member.home_of(moved[0]) is None


async def test_a_replica_that_left_beats_no_more() -> None:
    """Its beat task may still run while it stops (backends take seconds to stop): a beat
    after the leave would have the others send it requests again."""
    link = _Link("cp-1")
    member = Homes(link, "http://cp-1:8080")  # type: ignore[arg-type]
    beats = asyncio.create_task(member.run())
    await asyncio.sleep(0)
    member.leave()
    member._beat()
    beats.cancel()
    await asyncio.gather(beats, return_exceptions=True)
    assert link.sent == [{"url": "http://cp-1:8080"}, {"leaving": True}]


def test_a_replica_without_a_url_serves_everything_itself() -> None:
    link = _Link("cp-1")
    member = Homes(link, None)  # type: ignore[arg-type]
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    assert all(member.home_of(f"m{i}") is None for i in range(20))
    member.leave()
    assert link.sent == []


async def test_a_url_is_used_only_once_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(homes.time, "monotonic", lambda: now[0])
    answers = {"http://cp-2:8080": False}
    asked: list[str] = []

    async def reachable(url: str) -> bool:
        asked.append(url)
        return answers.get(url, False)

    link = _Link("cp-1")
    member = Homes(link, "http://cp-1:8080", reachable)  # type: ignore[arg-type]
    models = [f"m{i}" for i in range(40)]

    async def hear(url: str) -> None:
        link.handler("cp-2", {"url": url})
        await asyncio.sleep(0)  # the check runs
        await asyncio.sleep(0)

    await hear("http://cp-2:8080")
    assert asked == ["http://cp-2:8080"]
    assert all(member.home_of(m) is None for m in models)  # it did not answer: all served here
    await hear("http://cp-2:8080")
    assert asked == ["http://cp-2:8080"]  # not asked again before RECHECK_S
    answers["http://cp-2:8080"] = True
    now[0] += homes.RECHECK_S + 1
    await hear("http://cp-2:8080")
    homed = [m for m in models if member.home_of(m) is not None]
    assert len(asked) == 2 and homed
    # A forwarded request found nobody: its models come back here until it answers again.
    member.unreachable("cp-2")
    assert all(member.home_of(m) is None for m in models)
    await hear("http://cp-2:8080")
    assert len(asked) == 2
    # A new URL is checked at once.
    answers["http://cp-2.internal:8080"] = True
    await hear("http://cp-2.internal:8080")
    assert member.home_of(homed[0]) == Home("cp-2", "http://cp-2.internal:8080")
    await member.close()


async def test_a_replica_leaving_while_its_url_is_checked_is_no_home() -> None:
    answer = asyncio.Event()

    async def reachable(_url: str) -> bool:
        await answer.wait()
        return True

    link = _Link("cp-1")
    member = Homes(link, "http://cp-1:8080", reachable)  # type: ignore[arg-type]
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    await asyncio.sleep(0)  # the check is under way
    link.handler("cp-2", {"leaving": True})
    answer.set()  # its URL still answered the check, from before it left
    for _ in range(3):
        await asyncio.sleep(0)
    assert all(member.home_of(f"m{i}") is None for i in range(40))
    # It comes back: a new check runs, and it is a home again once its URL answers.
    link.handler("cp-2", {"url": "http://cp-2:8080"})
    for _ in range(3):
        await asyncio.sleep(0)
    assert any(member.home_of(f"m{i}") is not None for i in range(40))
    await member.close()
