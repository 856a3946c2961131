"""The fleet's cross-replica transport over real NATS: presence, routing errors, replies and
relayed output, between hubs in one process (the e2e tests use real probes and servers)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from legator.core.cluster import ClusterLink
from legator.fleet.cluster import MOVE_WAIT_S, FleetCluster
from legator.fleet.hub import Hub, ProbeNotConnected
from legator.fleet.protocol import (
    T_COMMAND,
    T_PING,
    Ack,
    CommandResult,
    CommandSpec,
    OutputChunk,
    signed,
)
from tests.support import NATS_URL, until

KEY = secrets.token_bytes(32)


async def _enrolled_before_salts(probe_id: str) -> str:
    """No database here: every probe's key has the empty salt."""
    return ""


class Replica:
    def __init__(self, prefix: str, name: str, interval_s: float) -> None:
        self.link = ClusterLink(
            NATS_URL,
            prefix=prefix,
            replica_id=name,
            master_key=KEY,
            registry=CollectorRegistry(),
        )
        self.hub = Hub(KEY, salts=_enrolled_before_salts)
        self.cluster = FleetCluster(self.link, self.hub, interval_s=interval_s)
        self.hub.cluster = self.cluster

    async def start(self) -> Replica:
        await self.link.start()
        await self.cluster.start()
        await self.link.flush()
        self.beats = asyncio.create_task(self.cluster.run())
        return self

    async def close(self) -> None:
        self.beats.cancel()
        await self.cluster.close()
        await self.link.close()


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Replica, Replica]]:
    prefix = "test-" + secrets.token_hex(4)
    a = await Replica(prefix, "a", 0.1).start()
    b = await Replica(prefix, "b", 0.1).start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_presence_follows_announcements_beats_and_silence(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    b.cluster.announce("prb-1", up=True, since=time.time())
    await until(lambda: a.hub.is_connected("prb-1"))
    assert a.cluster.holder("prb-1") == "b"
    b.cluster.announce("prb-1", up=False, since=time.time())
    await until(lambda: not a.hub.is_connected("prb-1"))

    # A down from a replica that no longer holds the probe changes nothing.
    b.cluster.announce("prb-2", up=True, since=time.time())
    await until(lambda: a.cluster.holder("prb-2") == "b")
    a.cluster._on_presence("c", {"op": "down", "probes": ["prb-2"]})
    assert a.cluster.holder("prb-2") == "b"

    # B's beats list no probe, so its announced one expires after three intervals.
    await until(lambda: a.cluster.holder("prb-2") is None)
    assert "b" in [r["replica"] for r in a.cluster.status()["replicas"]]

    b.cluster.announce("prb-3", up=True, since=time.time())
    await until(lambda: a.cluster.holder("prb-3") == "b")
    b.cluster.leave()
    await until(lambda: a.cluster.holder("prb-3") is None and "b" not in a.cluster.replicas)
    # Its presence task may still run while it stops: a beat after the bye counts it again.
    b.cluster.beat()
    await asyncio.sleep(0.3)
    assert "b" not in a.cluster.replicas


async def test_routing_errors_are_clear(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    envelope = signed(T_PING, {}, a.hub.key_for("prb-9", ""))
    with pytest.raises(ProbeNotConnected, match="not connected to any replica"):
        await a.hub.send_envelope("prb-9", envelope)

    # A replica that vanished without a word: nobody answers on its subject.
    a.cluster._on_presence("ghost", {"op": "up", "probes": ["prb-9"], "since": time.time()})
    with pytest.raises(ProbeNotConnected, match=r"replica ghost, which held it.* is gone"):
        await a.hub.send_envelope("prb-9", envelope)
    assert a.cluster.holder("prb-9") is None and "ghost" not in a.cluster.replicas

    # B is said to hold it but has no socket for it (it just left): one wait, then the truth.
    b.cluster.announce("prb-9", up=True, since=time.time())
    await until(lambda: a.cluster.holder("prb-9") == "b")
    asked, waits = _spy(a.cluster, "_ask"), _spy(a.cluster, "_await_holder")
    started = time.monotonic()
    with pytest.raises(ProbeNotConnected, match="not connected to any replica"):
        await a.hub.send("prb-9", T_PING, {})
    assert time.monotonic() - started >= MOVE_WAIT_S * 0.9  # the wait was really waited
    assert [holder for holder, *_ in asked] == ["b"]
    assert waits == [("prb-9", MOVE_WAIT_S)]


def _spy(cluster: FleetCluster, name: str) -> list[tuple[Any, ...]]:
    """Record each call of ``cluster.name`` (its positional arguments) and let it run."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(cluster, name)

    async def spied(*args: Any) -> Any:
        calls.append(args)
        return await real(*args)

    setattr(cluster, name, spied)
    return calls


async def test_replies_go_back_to_the_replica_that_asked(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    seen: list[tuple[str, Any]] = []
    a.hub.remote_reply_hooks.append(lambda key, value: seen.append((key, value)))
    spec = CommandSpec(request_id="req-1", command="uname", timeout_s=5)
    command = signed(T_COMMAND, spec, a.hub.key_for("prb-1", ""))
    ping = signed(T_PING, {}, a.hub.key_for("prb-1", ""))
    b.cluster._expect_reply("a", command)  # as B does when it forwards them for A
    b.cluster._expect_reply("a", ping)

    waiter = a.hub.expect("req-1")
    result = CommandResult(request_id="req-1", status="completed", exit_code=0, stdout="Linux\n")
    assert b.hub.resolve("req-1", result) is False  # no waiter on B: sent to A
    assert await asyncio.wait_for(waiter, 5) == result
    assert seen == [("req-1", result)]

    ack_waiter = a.hub.expect(ping.id)
    b.hub.resolve(ping.id, Ack(ref=ping.id, type=T_PING))
    assert (await asyncio.wait_for(ack_waiter, 5)).ref == ping.id

    # Each reply goes back once; one nobody asked for goes nowhere.
    assert b.cluster.forward_reply("req-1", result) is False
    assert b.cluster.forward_reply("unknown", result) is False


async def test_output_is_relayed_to_followers_only_while_they_follow(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    got: list[OutputChunk | None] = []
    stop = await a.hub.follow("req-7", got.append)
    chunk = OutputChunk(request_id="req-7", seq=0, stream="stdout", data="hello\n")
    b.hub.relay_output("req-7", chunk)
    b.hub.relay_output("req-7", None)
    b.hub.relay_output("req-8", chunk)  # another command: not followed
    await until(lambda: len(got) == 2)
    assert got == [chunk, None]
    stop()
    await asyncio.sleep(0.1)
    b.hub.relay_output("req-7", chunk)
    await asyncio.sleep(0.3)
    assert len(got) == 2
    assert await a.hub.follow("not.a.token", got.append) is not None  # refused quietly


async def test_a_single_process_hub_is_unchanged() -> None:
    hub = Hub(KEY)
    assert not hub.is_connected("prb-1")
    with pytest.raises(ProbeNotConnected, match=r"^probe prb-1 is not connected$"):
        await hub.send("prb-1", T_PING, {})
    assert hub.resolve("x", None) is False
    hub.relay_output("req", None)
    (await hub.follow("req", lambda _: None))()
    assert hub.cluster_status().enabled is False
