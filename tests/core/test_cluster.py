"""The cluster bus over the machine's real NATS server (and a private one to stop)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry

from legator.core.auth.attempts import AttemptLimiter
from legator.core.cluster import (
    KEY_INFO,
    ClusterLink,
    ClusterUnavailable,
    Message,
    NoReply,
    NoResponder,
    Replayed,
    ReplayGuard,
    Sealer,
    SealError,
    redact_url,
)
from legator.core.config import ConfigError, load_settings
from legator.core.events.cluster import ClusterEventBus
from tests.support import NATS_URL, NatsServer, free_port, until

KEY = secrets.token_bytes(32)


def make_link(
    prefix: str, replica: str, *, url: str = NATS_URL, key: bytes = KEY, wait_s: float = 10
) -> ClusterLink:
    return ClusterLink(
        url,
        prefix=prefix,
        replica_id=replica,
        master_key=key,
        registry=CollectorRegistry(),
        connect_wait_s=wait_s,
    )


@pytest.fixture
def prefix() -> str:
    return "test-" + secrets.token_hex(4)


@pytest.fixture
async def pair(prefix: str) -> AsyncIterator[tuple[ClusterLink, ClusterLink]]:
    a, b = make_link(prefix, "a"), make_link(prefix, "b")
    await a.start()
    await b.start()
    try:
        # start() goes on alone when NATS is slow to answer; these tests need both joined.
        assert a.connected and b.connected, "a replica did not join NATS within 10 s"
        yield a, b
    finally:
        await a.close()
        await b.close()


def dropped(link: ClusterLink, reason: str) -> float:
    return link.dropped.labels(reason)._value.get()


# ---- sealing -----------------------------------------------------------------------------


def test_sealed_messages_open_only_with_the_key_the_subject_and_in_time() -> None:
    sealer = Sealer(KEY)
    # Long enough markers that random ciphertext cannot contain them by chance.
    replica, secret = "replica-7f3a", "lpk_" + "ab" * 16
    data = sealer.seal("p.x", replica, {"secret": secret})
    assert secret.encode() not in data and replica.encode() not in data
    assert sealer.open("p.x", data) == (replica, {"secret": secret})
    with pytest.raises(SealError, match="does not authenticate"):
        sealer.open("p.y", data)  # moved to another subject
    with pytest.raises(SealError, match="does not authenticate"):
        Sealer(secrets.token_bytes(32)).open("p.x", data)
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(SealError):
        sealer.open("p.x", tampered)
    with pytest.raises(SealError, match="old"):
        sealer.open("p.x", data, now=time.time() + 301)
    with pytest.raises(SealError, match="too short"):
        sealer.open("p.x", b"abc")


def test_a_sealed_message_opens_once() -> None:
    sender, receiver = Sealer(KEY), Sealer(KEY)
    first, second = (sender.seal("p.x", "a", {"n": n}) for n in (1, 2))
    assert receiver.open("p.x", second) == ("a", {"n": 2})
    assert receiver.open("p.x", first) == ("a", {"n": 1})  # arrived late: still new
    for data in (first, second):
        with pytest.raises(Replayed, match="delivered before"):
            receiver.open("p.x", data)
    # The same replica id after a restart is another sender: its numbers start again.
    assert Sealer(KEY).open("p.x", Sealer(KEY).seal("p.x", "a", {})) == ("a", {})
    restarted = Sealer(KEY).seal("p.x", "a", {"restarted": True})
    assert receiver.open("p.x", restarted) == ("a", {"restarted": True})


def test_replays_are_told_apart_from_late_messages_within_the_window() -> None:
    guard = ReplayGuard(window=8)
    for number in (5, 3, 9, 6):
        guard.admit("a", "e1", number)
    for number in (5, 3, 9, 6):
        with pytest.raises(Replayed, match="delivered before"):
            guard.admit("a", "e1", number)
    guard.admit("a", "e1", 2)  # 7 behind the newest: late, not seen
    with pytest.raises(Replayed, match="too far behind"):
        guard.admit("a", "e1", 1)  # 8 behind: could be either, refused
    guard.admit("a", "e1", 17)  # slot 1 again: the ring keeps the newest number there
    with pytest.raises(Replayed):
        guard.admit("a", "e1", 9)
    guard.admit("a", "e2", 9)  # another run of the same replica
    guard.admit("b", "e1", 9)  # another replica


def test_a_message_without_a_sequence_number_is_refused() -> None:
    """One sealed by a replica of a Legator before numbering could be replayed unnoticed."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO).derive(KEY)
    aead, nonce = AESGCM(key), os.urandom(12)
    plain = json.dumps({"o": "old", "t": time.time(), "b": {}}).encode()
    with pytest.raises(SealError, match="no sequence number"):
        Sealer(KEY).open("p.x", nonce + aead.encrypt(nonce, plain, b"p.x"))


def test_urls_are_logged_without_credentials() -> None:
    assert redact_url("nats://user:pw@n1:4222, tls://tok@n2:4222") == (
        "nats://***@n1:4222,tls://***@n2:4222"
    )
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_settings_for_several_replicas() -> None:
    key = secrets.token_hex(32)
    settings = load_settings(nats_url="nats://a:4222,nats://b:4222", signing_key=key)
    assert settings.nats_subject_prefix == "legator" and settings.replica_id is None
    with pytest.raises(ConfigError, match="LEGATOR_NATS_URL needs LEGATOR_SIGNING_KEY"):
        load_settings(nats_url="nats://a:4222")
    with pytest.raises(ConfigError, match=r"^LEGATOR_NATS_URL: expected nats://") as bad:
        load_settings(nats_url="http://user:hunter2@a:4222", signing_key=key)
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ConfigError, match=r"^LEGATOR_REPLICA_ID:"):
        load_settings(replica_id="a.b")
    with pytest.raises(ConfigError, match=r"^LEGATOR_NATS_SUBJECT_PREFIX:"):
        load_settings(nats_subject_prefix="legator.>")
    assert load_settings(nats_url="").nats_url is None


def test_subject_tokens_cannot_widen_a_subject(prefix: str) -> None:
    link = make_link(prefix, "a")
    assert link.subject("out", "0b6c-x_y") == f"{prefix}.out.0b6c-x_y"
    for bad in ("a.b", "*", ">", "a b", ""):
        with pytest.raises(ValueError, match="subject token"):
            link.subject("out", bad)


# ---- messaging ---------------------------------------------------------------------------


async def test_broadcasts_reach_the_other_replicas_not_the_sender(
    pair: tuple[ClusterLink, ClusterLink],
) -> None:
    a, b = pair
    got: dict[str, list[tuple[str, dict[str, Any]]]] = {"a": [], "b": []}
    a.on_broadcast("note", lambda origin, body: got["a"].append((origin, body)))
    b.on_broadcast("note", lambda origin, body: got["b"].append((origin, body)))
    for n in range(5):
        a.broadcast("note", {"n": n})
    await until(lambda: len(got["b"]) == 5)
    assert got["b"] == [("a", {"n": n}) for n in range(5)]  # in order
    await asyncio.sleep(0.2)
    assert got["a"] == []


async def test_a_shared_attempt_limit_counts_on_every_replica(
    pair: tuple[ClusterLink, ClusterLink],
) -> None:
    a, b = pair
    on_a, on_b, elsewhere = AttemptLimiter(3, 60), AttemptLimiter(3, 60), AttemptLimiter(3, 60)
    on_a.share(a, "sign-in")
    on_b.share(b, "sign-in")
    elsewhere.share(b, "device-start")  # another limiter: counts of its own
    assert on_a.count("10.0.0.1") and on_a.count("10.0.0.1")
    await until(lambda: on_b.used("10.0.0.1") == 2)
    assert on_b.count("10.0.0.1")  # the third, through the other replica
    assert not on_b.count("10.0.0.1")
    await until(lambda: on_a.used("10.0.0.1") == 3)
    assert not on_a.count("10.0.0.1") and on_a.used("10.0.0.2") == 0
    on_b.refund("10.0.0.1")  # a sign-in that succeeded gives its attempt back everywhere
    await until(lambda: on_a.used("10.0.0.1") == 2)
    on_a.forget("10.0.0.1")
    await until(lambda: on_b.used("10.0.0.1") == 0)
    # What is not an operation on a client is ignored.
    a.broadcast("attempts.sign-in", {"op": "wipe", "client": "10.0.0.1"})
    a.broadcast("attempts.sign-in", {"op": "count", "client": ["10.0.0.1"]})
    a.broadcast("attempts.sign-in", {"op": "count", "client": "10.0.0.3"})
    await until(lambda: on_b.used("10.0.0.3") == 1)
    assert on_b.used("10.0.0.1") == 0 and elsewhere.used("10.0.0.1") == 0


async def test_requests_answers_and_missing_responders(
    pair: tuple[ClusterLink, ClusterLink],
) -> None:
    a, b = pair

    async def echo(message: Message) -> None:
        await b.respond(message, {"echo": message.body["x"], "from": message.origin})

    async def silent(message: Message) -> None:
        return None

    await b.subscribe(b.subject("echo"), echo)
    await b.subscribe(b.subject("silent"), silent)
    await b.flush()
    answer = await a.request(a.subject("echo"), {"x": 42}, wait_s=5)
    assert answer.origin == "b" and answer.body == {"echo": 42, "from": "a"}
    with pytest.raises(NoResponder):
        await a.request(a.subject("nobody"), {}, wait_s=5)
    with pytest.raises(NoReply):
        await a.request(a.subject("silent"), {}, wait_s=0.3)


class WireTap:
    """A TCP relay in front of the machine's NATS that keeps what the client wrote."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> WireTap:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        nats_in, nats_out = await asyncio.open_connection("127.0.0.1", 4222)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            while data := await src.read(65536):
                if keep:
                    self.sent += data
                dst.write(data)
            dst.close()

        await asyncio.gather(
            pipe(client_in, nats_out, True),
            pipe(nats_in, client_out, False),
            return_exceptions=True,
        )


async def test_flush_returns_only_once_the_server_has_the_subscriptions_made_before(
    prefix: str,
) -> None:
    """nats-py's own flush writes its PING ahead of a SUB still queued for its flusher task,
    so the server could answer before it had the subscription (a request right after then
    got "no responders", now and then); the link's flush waits for a PING sent after it."""
    async with WireTap() as tap:
        link = make_link(prefix, "a", url=f"nats://127.0.0.1:{tap.port}")
        await link.start()
        try:
            await link.subscribe(link.subject("echo"), lambda message: asyncio.sleep(0))
            await link.flush()
            sent = bytes(tap.sent)
            subscribed = sent.find(f"SUB {link.subject('echo')} ".encode())
            assert 0 <= subscribed < sent.rfind(b"PING\r\n")
        finally:
            await link.close()


async def test_messages_larger_than_nats_takes_are_split_and_joined(
    pair: tuple[ClusterLink, ClusterLink],
) -> None:
    a, b = pair
    received: list[dict[str, Any]] = []

    async def keep(message: Message) -> None:
        received.append(message.body)

    async def measure(message: Message) -> None:
        await b.respond(message, {"chars": len(message.body["blob"])})

    await b.subscribe(b.subject("big"), keep)
    await b.subscribe(b.subject("measure"), measure)
    await b.flush()
    blob = secrets.token_hex(1_500_000)  # 3 MB, the server takes 1 MiB per message
    a.publish(a.subject("big"), {"blob": blob})
    a.publish(a.subject("big"), {"small": True})
    await until(lambda: len(received) == 2)
    assert received[0]["blob"] == blob and received[1] == {"small": True}
    # A request too: its parts name one inbox, which the answer reaches.
    answer = await a.request(a.subject("measure"), {"blob": blob}, wait_s=10)
    assert answer.origin == "b" and answer.body == {"chars": len(blob)}
    with pytest.raises(NoResponder):
        await a.request(a.subject("nobody"), {"blob": blob}, wait_s=5)


async def test_a_message_replayed_on_the_bus_is_delivered_once(
    pair: tuple[ClusterLink, ClusterLink],
) -> None:
    """Whoever can publish on NATS can send a captured message again; it is dropped."""
    a, b = pair
    heard: list[dict[str, Any]] = []
    b.on_broadcast("note", lambda _, body: heard.append(body))
    captured: list[bytes] = []
    spy = await nats.connect(NATS_URL)
    try:

        async def capture(msg: Any) -> None:
            captured.append(msg.data)

        await spy.subscribe(a.subject("all"), cb=capture)
        await spy.flush()
        a.broadcast("note", {"op": "lock-out", "client": "10.0.0.1"})
        await until(lambda: len(heard) == 1 and len(captured) == 1)
        for _ in range(3):
            await spy.publish(a.subject("all"), captured[0])
        await spy.flush()
        await until(lambda: dropped(b, "replayed") == 3)
        a.broadcast("note", {"after": True})  # the sender's next message still goes through
        await until(lambda: len(heard) == 2)
        assert heard == [{"op": "lock-out", "client": "10.0.0.1"}, {"after": True}]
    finally:
        await spy.close()


async def test_a_replica_with_another_key_is_not_heard(prefix: str) -> None:
    a, stranger = make_link(prefix, "a"), make_link(prefix, "x", key=secrets.token_bytes(32))
    await a.start()
    await stranger.start()
    try:
        heard: list[str] = []
        a.on_broadcast("note", lambda origin, _: heard.append(origin))
        stranger.broadcast("note", {"forged": True})
        await until(lambda: dropped(a, "unauthenticated") >= 1)
        assert heard == []
    finally:
        await a.close()
        await stranger.close()


async def test_nats_down_at_start_then_up_then_lost_then_back(prefix: str) -> None:
    nats = NatsServer(free_port())
    link, peer = make_link(prefix, "a", url=nats.url, wait_s=0.3), None
    states: list[bool] = []
    link.on_state(states.append)
    heard: list[dict[str, Any]] = []
    link.on_broadcast("note", lambda _, body: heard.append(body))
    try:
        # Nothing listens there: start goes on without it after its 0.3 s (one that waited
        # for the first connection would wait for good).
        await asyncio.wait_for(link.start(), 10)
        assert not link.connected
        link.publish(link.subject("x"), {})
        assert dropped(link, "disconnected") == 1
        with pytest.raises(ClusterUnavailable, match="unreachable"):
            await link.request(link.subject("x"), {}, wait_s=1)
        assert link.status()["connected"] is False and link.status()["down_since"]

        nats.start()
        await until(lambda: link.connected)
        assert states == [True] and link.up_gauge._value.get() == 1
        peer = make_link(prefix, "b", url=nats.url)
        await peer.start()
        await link.flush()
        peer.broadcast("note", {"n": 1})  # the listener made before the first connection works
        await until(lambda: heard == [{"n": 1}])

        nats.stop()
        await until(lambda: not link.connected)
        assert states == [True, False] and link.up_gauge._value.get() == 0
        link.publish(link.subject("x"), {})  # dropped, not raised and not kept for later
        assert dropped(link, "disconnected") == 2

        nats.start()
        await until(lambda: link.connected and peer.connected, timeout=15)
        assert states == [True, False, True]
        peer.broadcast("note", {"n": 2})  # subscriptions came back with the connection
        await until(lambda: heard == [{"n": 1}, {"n": 2}])
    finally:
        await link.close()
        if peer is not None:
            await peer.close()
        nats.stop()


# ---- events ------------------------------------------------------------------------------


async def test_events_reach_every_replica_once(pair: tuple[ClusterLink, ClusterLink]) -> None:
    a, b = pair
    bus_a, bus_b = ClusterEventBus(a), ClusterEventBus(b)
    with (
        bus_a.subscribe("probe.*") as on_a,
        bus_b.subscribe("probe.*") as on_b,
        bus_b.subscribe("command.*") as other_topic,
    ):
        event = await bus_a.publish("probe.connected", {"probe_id": "prb-1"})
        local = await on_a.get(wait=1)
        remote = await on_b.get(wait=5)
        assert local == event
        assert remote is not None and remote.as_dict() == event.as_dict()
        assert await on_a.get(wait=0.3) is None  # not again from the bus
        assert await other_topic.get(wait=0.1) is None
    await bus_a.close()
    await bus_b.close()
