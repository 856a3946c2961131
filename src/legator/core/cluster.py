"""The cluster bus: how several ``legator serve`` replicas talk to each other, over NATS.

One NATS connection per replica (nats-py, core NATS; nothing is stored on the bus). NATS is a
trust boundary: every message is sealed with AES-GCM under a key derived from the master
signing key, which every replica shares anyway to derive the probes' keys. The subject is the
associated data, so whoever else reaches the NATS server can neither read a message, forge
one, nor move one to another subject; a message older than ``MAX_AGE_S`` is dropped.

``publish`` is fire-and-forget through one ordered outbox, so callers stay synchronous and
never wait on the network; while NATS is unreachable a message is dropped and counted, not
buffered to arrive stale later. ``request`` goes straight out and fails fast. A connection
that cannot be made at start, or is lost later, is retried forever in the background while
this replica keeps serving what it can alone; the change is logged once each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic_core import to_jsonable_python

from legator.core.audit.sanitiser import clip_for_log
from legator.core.errors import ServiceUnavailable
from legator.core.logging import get_logger

log = get_logger("legator.core.cluster")
TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
MAX_AGE_S = 300.0
OUTBOX_LIMIT = 100_000
PART_HEADER = "Legator-Part"
MAX_PARTS = 64
MAX_PARTIAL = 64
PARTIAL_TTL_S = 30.0
HEADER_ROOM = 512
# How the NATS server says, in a message to the reply subject, that nobody listens.
STATUS_HEADER, NO_RESPONDERS = "Status", "503"
BROADCAST = "all"
KEY_INFO = b"legator-cluster-bus|v1"
# How far behind the newest message of a sender an older one may still arrive: nats-py hands
# each subscription's messages to its own task, so one subscription's messages can be checked
# after later ones of another. Further behind than this, its queue would be far past what a
# healthy replica holds; such a message is refused as a replay might be.
REPLAY_WINDOW = 1 << 16
# A sender's record outlives anything it sent that the age check would still let in.
REPLAY_FORGET_S = 2 * MAX_AGE_S + 60


class ClusterUnavailable(ServiceUnavailable):
    """The bus cannot carry this message now."""


class NoResponder(ClusterUnavailable):
    """Nobody listens on the subject: the replica it names is gone."""


class NoReply(ClusterUnavailable):
    """The request went out but no answer came back in time."""


class SealError(Exception):
    pass


class Replayed(SealError):
    """An authentic message that was already delivered."""


@dataclass(slots=True)
class _Sender:
    ring: array[int]  # slot ``n % window`` holds the last number accepted there
    newest: int
    seen_at: float


class ReplayGuard:
    """The sequence numbers each sender (a replica's run: its id and a random epoch) has had
    accepted, over the last ``REPLAY_WINDOW`` of them, in a ring, so that a check costs the
    same however busy the bus is."""

    def __init__(self, window: int = REPLAY_WINDOW) -> None:
        self.window = window
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._next_sweep = time.monotonic() + REPLAY_FORGET_S

    def admit(self, origin: str, epoch: str, number: int) -> None:
        """Raise ``Replayed`` if ``number`` was accepted from this sender before, or is too
        far behind its newest to tell."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._forget_idle(now)
        sender = self._senders.get((origin, epoch))
        if sender is None:
            sender = _Sender(array("q", [-1]) * self.window, number, now)
            self._senders[(origin, epoch)] = sender
        if number <= sender.newest - self.window:
            raise Replayed(f"message {number} from {origin} is too far behind its newest")
        slot = number % self.window
        if sender.ring[slot] == number:
            raise Replayed(f"message {number} from {origin} was delivered before")
        sender.ring[slot] = number
        sender.newest = max(sender.newest, number)
        sender.seen_at = now

    def _forget_idle(self, now: float) -> None:
        self._next_sweep = now + REPLAY_FORGET_S
        for key, sender in list(self._senders.items()):
            if sender.seen_at < now - REPLAY_FORGET_S:
                del self._senders[key]


def redact_url(url: str) -> str:
    """The server list as it may be logged: user names, passwords and tokens removed."""
    safe = []
    for server in url.split(","):
        parts = urlsplit(server.strip())
        host = parts.netloc.rpartition("@")[2]
        safe.append(f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}")
    return ",".join(safe)


class Sealer:
    """AES-GCM over ``{origin, epoch, number, time, body}`` with the subject as associated
    data. The epoch is random for each sealer (each run of a replica) and the number counts
    its messages, so that ``open`` can refuse one it has opened before."""

    def __init__(self, master_key: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO).derive(
            master_key
        )
        self._aead = AESGCM(key)
        self._epoch = secrets.token_hex(8)
        self._numbers = itertools.count(1)
        self._seen = ReplayGuard()

    def seal(self, subject: str, origin: str, body: dict[str, Any]) -> bytes:
        plain = json.dumps(
            {"o": origin, "e": self._epoch, "n": next(self._numbers), "t": time.time(), "b": body},
            separators=(",", ":"),
            default=to_jsonable_python,
        ).encode()
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, subject.encode())

    def open(
        self, subject: str, data: bytes, *, now: float | None = None
    ) -> tuple[str, dict[str, Any]]:
        if len(data) < 12 + 16:
            raise SealError("too short to be a sealed message")
        try:
            plain = self._aead.decrypt(data[:12], data[12:], subject.encode())
        except InvalidTag:
            raise SealError(
                "it does not authenticate: sent with another LEGATOR_SIGNING_KEY, "
                "for another subject, or not by a replica"
            ) from None
        message = json.loads(plain)
        age = (time.time() if now is None else now) - float(message["t"])
        if abs(age) > MAX_AGE_S:
            raise SealError(f"it is {age:.0f}s old (clocks apart, or replayed)")
        origin, number = str(message["o"]), message.get("n")
        if not isinstance(number, int) or isinstance(number, bool):
            raise SealError(f"it carries no sequence number: {origin} runs an older Legator")
        self._seen.admit(origin, str(message.get("e")), number)
        return origin, dict(message["b"])


@dataclass(frozen=True)
class Message:
    subject: str
    origin: str
    body: dict[str, Any]
    reply: str = ""


Handler = Callable[[Message], Awaitable[None]]
BroadcastHandler = Callable[[str, dict[str, Any]], None]


async def settle(nc: NatsClient) -> None:
    """Return once the server has processed everything sent so far. nats-py's ``flush()``
    writes its PING straight to the socket, ahead of commands still queued for its flusher
    task (a subscription just made): the server could answer PONG before it had them, and a
    request sent next got "no responders". The first round trip lets the queue go out; the
    second PING is written after it, so its PONG comes after the server processed it."""
    await nc.flush(timeout=2)
    await nc.flush(timeout=2)


class Listener:
    """A subscription that survives reconnects and may be made before the first connection."""

    def __init__(self, link: ClusterLink, subject: str, handler: Handler) -> None:
        self.link = link
        self.subject = subject
        self.handler = handler
        self.sub: NatsSubscription | None = None

    async def attach(self, nc: NatsClient) -> None:
        async def deliver(msg: Msg) -> None:
            await self.link._deliver(msg, self.handler)

        self.sub = await nc.subscribe(self.subject, cb=deliver)

    async def close(self) -> None:
        self.link._listeners.discard(self)
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()


def _parts(data: bytes, max_payload: int) -> list[tuple[bytes, dict[str, str] | None]]:
    """``data`` as the messages that carry it: itself, or, when larger than the server takes
    in one message (a file read, a long output), parts on one subject from one connection,
    which arrive in order and are joined before opening."""
    room = max_payload - HEADER_ROOM
    if len(data) <= room:
        return [(data, None)]
    count = math.ceil(len(data) / room)
    if count > MAX_PARTS:
        raise ClusterUnavailable(f"message of {len(data)} bytes is too large for the bus")
    message_id = uuid.uuid4().hex
    return [
        (data[index * room : (index + 1) * room], {PART_HEADER: f"{message_id} {index} {count}"})
        for index in range(count)
    ]


class ClusterLink:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        replica_id: str,
        master_key: bytes,
        registry: CollectorRegistry | None = None,
        connect_wait_s: float = 3.0,
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.prefix = prefix
        self.replica_id = replica_id
        self.connect_wait_s = connect_wait_s
        self._sealer = Sealer(master_key)
        self._nc: NatsClient | None = None
        self._ever_connected = False
        self._up = False
        self._down_since: float | None = time.time()
        self._listeners: set[Listener] = set()
        self._broadcast_listener: Listener | None = None
        self._broadcast: dict[str, BroadcastHandler] = {}
        self._state_hooks: list[Callable[[bool], None]] = []
        self._outbox: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while the outbox is empty
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._partial: OrderedDict[tuple[str, str], tuple[float, int, dict[int, bytes]]] = (
            OrderedDict()
        )
        self._closed = False
        self._last_error_log = 0.0
        self._last_drop_log = 0.0
        self._dropped_unlogged = 0
        self._last_bad_log = 0.0
        self.up_gauge = Gauge(
            "legator_cluster_connected",
            "1 while this replica is connected to the cluster bus (NATS).",
            registry=registry,
        )
        self.dropped = Counter(
            "legator_cluster_dropped_messages",
            "Cluster messages not sent or not accepted, by reason.",
            ["reason"],
            registry=registry,
        )

    # ---- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up and self._nc is not None and self._nc.is_connected

    def status(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "nats_url": self.safe_url,
            "connected": self.connected,
            "down_since": (
                datetime.fromtimestamp(self._down_since, UTC)
                if self._down_since is not None and not self.connected
                else None
            ),
        }

    def on_state(self, hook: Callable[[bool], None]) -> None:
        """``hook(True)`` after each (re)connection, ``hook(False)`` when it is lost."""
        self._state_hooks.append(hook)

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        self._down_since = None if up else time.time()
        self.up_gauge.set(1 if up else 0)
        for hook in list(self._state_hooks):
            try:
                hook(up)
            except Exception:
                log.exception("cluster state hook failed")

    def subject(self, *tokens: str) -> str:
        """``<prefix>.<token>…``; a token that could widen the subject is refused."""
        for token in tokens:
            if not TOKEN.match(token):
                raise ValueError(f"{token!r} cannot be a subject token")
        return ".".join((self.prefix, *tokens))

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background; wait up to ``connect_wait_s`` so a healthy cluster is
        joined before the replica serves, and go on alone (retrying) if NATS is not there."""
        self._broadcast_listener = await self.subscribe(self.subject(BROADCAST), self._on_broadcast)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._connect(first), name="cluster-connect"),
            asyncio.create_task(self._send_loop(), name="cluster-outbox"),
        ]
        try:
            await asyncio.wait_for(asyncio.shield(first), self.connect_wait_s)
        except TimeoutError:
            log.error(
                "cannot reach NATS: this replica runs alone (its own probes, its own events) "
                "and keeps trying",
                nats=self.safe_url,
                replica=self.replica_id,
            )

    async def _connect(self, first: asyncio.Future[None]) -> None:
        nc = NatsClient()
        self._nc = nc
        await nc.connect(
            servers=[server.strip() for server in self.url.split(",")],
            name=f"legator-{self.replica_id}",
            no_echo=True,  # our own broadcasts never come back
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # forever, also for the first connection
            reconnect_time_wait=1,
            connect_timeout=2,
            ping_interval=10,
            max_outstanding_pings=3,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._ever_connected = True
        for listener in list(self._listeners):
            if listener.sub is None:
                await listener.attach(nc)
        # "Joined" means the server has our subscriptions: a broadcast another replica sends
        # right after must reach us.
        with contextlib.suppress(Exception):
            await settle(nc)
        self._set_up(True)
        log.info("joined the cluster bus", nats=self.safe_url, replica=self.replica_id)
        if not first.done():
            first.set_result(None)

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed reconnection attempt (one a second): log some.
        now = time.monotonic()
        if now - self._last_error_log >= 30:
            self._last_error_log = now
            log.warning(
                "NATS connection error", nats=self.safe_url, error=clip_for_log(str(exc), 200)
            )

    async def _on_disconnected(self) -> None:
        if self._up:
            self._set_up(False)
            log.warning(
                "lost the connection to NATS; reconnecting. Meanwhile this replica reaches "
                "only its own probes and sees only its own events",
                nats=self.safe_url,
                replica=self.replica_id,
            )

    async def _on_reconnected(self) -> None:
        down_for = time.time() - (self._down_since or time.time())
        self._last_error_log = 0.0
        self._set_up(True)
        log.info(
            "reconnected to NATS",
            nats=self.safe_url,
            replica=self.replica_id,
            down_for_s=round(down_for, 1),
        )

    async def flush(self) -> None:
        """Wait until the server has everything sent so far (subscriptions included)."""
        if self.connected and self._nc is not None:
            with contextlib.suppress(Exception):
                await settle(self._nc)

    async def close(self) -> None:
        self._closed = True
        if self._outbox and self.connected:
            with contextlib.suppress(TimeoutError):  # a leaving replica's last words go out
                await asyncio.wait_for(self._idle.wait(), 2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nc, self._nc = self._nc, None
        self._set_up(False)
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                if nc.is_connected:
                    await settle(nc)
            with contextlib.suppress(Exception):
                await nc.close()
        self._listeners.clear()

    # ---- sending -------------------------------------------------------------------------

    def publish(self, subject: str, body: dict[str, Any]) -> None:
        """Queue a message for sending, in order; dropped (and counted) while disconnected."""
        if self._closed:
            return
        if not self.connected:
            self._drop("disconnected")
            return
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self._drop("overflow")
        self._outbox.append((subject, body))
        self._idle.clear()
        self._wake.set()

    def broadcast(self, kind: str, body: dict[str, Any]) -> None:
        """To every other replica, in order with this replica's other broadcasts."""
        self.publish(self.subject(BROADCAST), {"k": kind, "d": body})

    def on_broadcast(self, kind: str, handler: BroadcastHandler) -> None:
        self._broadcast[kind] = handler

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            sent = 0
            while self._outbox:
                if not self.connected:
                    for _ in range(len(self._outbox)):
                        self._drop("disconnected")
                    self._outbox.clear()
                    break
                subject, body = self._outbox.popleft()
                try:
                    await self._publish_now(subject, body)
                except Exception as exc:
                    self._drop("error")
                    log.warning(
                        "a cluster message could not be sent",
                        subject=subject,
                        error=clip_for_log(str(exc), 200),
                    )
                sent += 1
                if sent % 256 == 0:
                    await asyncio.sleep(0)  # a long outbox must not starve the loop
            if not self._outbox:
                self._idle.set()

    async def _publish_now(self, subject: str, body: dict[str, Any]) -> None:
        nc = self._nc
        if nc is None:
            raise ClusterUnavailable("not connected")
        data = self._sealer.seal(subject, self.replica_id, body)
        for chunk, headers in _parts(data, nc.max_payload):
            await nc.publish(subject, chunk, headers=headers)

    async def request(self, subject: str, body: dict[str, Any], *, wait_s: float) -> Message:
        """Send and wait for one sealed answer."""
        nc = self._nc
        if nc is None or not self.connected:
            raise ClusterUnavailable(f"the cluster bus (NATS at {self.safe_url}) is unreachable")
        data = self._sealer.seal(subject, self.replica_id, body)
        if len(data) > nc.max_payload - HEADER_ROOM:
            return await self._request_in_parts(nc, subject, data, wait_s)
        try:
            answer = await nc.request(subject, data, timeout=wait_s)
        except nats_errors.NoRespondersError:
            raise NoResponder(f"nobody answers on {subject}") from None
        except TimeoutError:
            raise NoReply(f"no answer on {subject} within {wait_s:.0f}s") from None
        except nats_errors.Error as exc:
            raise ClusterUnavailable(f"the cluster bus failed: {exc}") from None
        return self._opened(answer)

    async def _request_in_parts(
        self, nc: NatsClient, subject: str, data: bytes, wait_s: float
    ) -> Message:
        """A request larger than NATS takes in one message (a file written to a probe on
        another replica): its parts all name one inbox for the answer, or for the server's
        word that nobody listens."""
        parts = _parts(data, nc.max_payload)  # raises before anything is sent
        answered: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def on_answer(msg: Msg) -> None:
            if not answered.done():
                answered.set_result(msg)

        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=on_answer, max_msgs=1)
        try:
            for chunk, headers in parts:
                await nc.publish(subject, chunk, reply=inbox, headers=headers)
            answer = await asyncio.wait_for(answered, wait_s)
            if (answer.headers or {}).get(STATUS_HEADER) == NO_RESPONDERS:
                raise NoResponder(f"nobody answers on {subject}")
        except TimeoutError:
            raise NoReply(f"no answer on {subject} within {wait_s:.0f}s") from None
        except nats_errors.Error as exc:
            raise ClusterUnavailable(f"the cluster bus failed: {exc}") from None
        finally:
            with contextlib.suppress(nats_errors.Error):
                await subscription.unsubscribe()
        return self._opened(answer)

    def _opened(self, answer: Msg) -> Message:
        try:
            origin, reply = self._sealer.open(answer.subject, answer.data)
        except SealError as exc:
            raise ClusterUnavailable(f"refused an answer on the cluster bus: {exc}") from None
        return Message(answer.subject, origin, reply)

    async def respond(self, message: Message, body: dict[str, Any]) -> None:
        nc = self._nc
        if not message.reply or nc is None:
            return
        try:
            await nc.publish(message.reply, self._sealer.seal(message.reply, self.replica_id, body))
        except Exception as exc:
            log.warning("could not answer a cluster request", error=clip_for_log(str(exc), 200))

    def _drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()
        self._dropped_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 30:
            log.warning(
                "cluster messages dropped",
                reason=reason,
                count=self._dropped_unlogged,
                nats=self.safe_url,
            )
            self._last_drop_log, self._dropped_unlogged = now, 0

    # ---- receiving -----------------------------------------------------------------------

    async def subscribe(self, subject: str, handler: Handler) -> Listener:
        listener = Listener(self, subject, handler)
        self._listeners.add(listener)
        if self._ever_connected and self._nc is not None and not self._nc.is_closed:
            await listener.attach(self._nc)  # nats-py replays it after a reconnect
        return listener

    async def _deliver(self, msg: Msg, handler: Handler) -> None:
        data: bytes | None = msg.data
        part = (msg.headers or {}).get(PART_HEADER)
        if part is not None:
            data = self._join(msg.subject, part, msg.data)
            if data is None:
                return
        try:
            origin, body = self._sealer.open(msg.subject, data)
        except (SealError, ValueError, KeyError, TypeError) as exc:
            self.dropped.labels(
                "replayed" if isinstance(exc, Replayed) else "unauthenticated"
            ).inc()
            now = time.monotonic()
            if now - self._last_bad_log >= 30:
                self._last_bad_log = now
                log.warning("dropped a cluster message", subject=msg.subject, why=str(exc))
            return
        if origin == self.replica_id:
            return
        try:
            await handler(Message(msg.subject, origin, body, msg.reply))
        except Exception:
            log.exception("cluster message handling failed", subject=msg.subject, origin=origin)

    def _join(self, subject: str, header: str, chunk: bytes) -> bytes | None:
        try:
            message_id, index_s, count_s = header.split(" ")
            index, count = int(index_s), int(count_s)
        except ValueError:
            return None
        if not (0 < count <= MAX_PARTS and 0 <= index < count):
            return None
        now = time.monotonic()
        while self._partial and (
            len(self._partial) > MAX_PARTIAL
            or next(iter(self._partial.values()))[0] < now - PARTIAL_TTL_S
        ):
            self._partial.popitem(last=False)
        key = (subject, message_id)
        _, _, parts = self._partial.setdefault(key, (now, count, {}))
        parts[index] = chunk
        if len(parts) < count:
            return None
        del self._partial[key]
        return b"".join(parts[i] for i in range(count))

    async def _on_broadcast(self, message: Message) -> None:
        handler = self._broadcast.get(str(message.body.get("k")))
        if handler is not None:
            handler(message.origin, dict(message.body.get("d") or {}))
