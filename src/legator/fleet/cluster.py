"""Fleet traffic between replicas: presence, routed sends, replies and live command output.

A probe's socket lives on one replica, its *holder*. Every replica keeps a presence map,
probe → holder, fed over the cluster bus: ``up``/``down`` when a socket attaches or goes, and
a ``beat`` every interval listing the holder's probes. The beat is also the holder's lease:
an entry not refreshed for three intervals expires, so a replica that died without a word
stops counting within seconds. ``Hub.is_connected`` reads this map: it is synchronous and
called for every probe of a listing, so it cannot ask the database or the network.

Sending to a probe held elsewhere is a request to the holder's ``route`` subject carrying the
envelope this replica already signed with the probe's key. The holder checks that signature,
writes the envelope to the socket unchanged and confirms, so a failure comes back as a clear
error rather than silence. The holder remembers which replica asked for which reply key (the
envelope id an ack names; the request id of a command or file request), and a reply that
finds no waiter there is sent back to that replica. Output chunks and end-of-command markers
go to ``out.<request id>``, which a replica serving that command's stream listens to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from legator.core.cluster import (
    ClusterLink,
    ClusterUnavailable,
    Listener,
    Message,
    NoReply,
    NoResponder,
)
from legator.core.logging import get_logger
from legator.fleet.protocol import (
    SIGNED_TYPES,
    T_COMMAND,
    T_FILE_REQUEST,
    Ack,
    CommandResult,
    Envelope,
    FileResult,
    OutputChunk,
    sign,
)

if TYPE_CHECKING:
    from legator.fleet.hub import Hub

log = get_logger("legator.fleet.cluster")
PRESENCE = "presence"
ROUTE_TIMEOUT_S = 5.0
MOVE_WAIT_S = 1.0
BEAT_CHUNK = 2000
REPLY_TTL_S = 600.0
REPLY_MODELS: dict[str, type[BaseModel]] = {
    "ack": Ack,
    "file_result": FileResult,
    "command_result": CommandResult,
}
_KIND_OF = {model: kind for kind, model in REPLY_MODELS.items()}
Deliver = Callable[[OutputChunk | None], None]


def _nothing() -> None:
    return None


class FleetCluster:
    def __init__(self, link: ClusterLink, hub: Hub, *, interval_s: float) -> None:
        self.link = link
        self.hub = hub
        self.interval_s = interval_s
        self.ttl_s = 3 * interval_s
        self.holders: dict[str, tuple[str, float]] = {}  # probe → (replica, refreshed)
        self.replicas: dict[str, float] = {}  # replica → last heard (monotonic)
        self._reply_to: dict[str, tuple[str, float]] = {}  # reply key → (replica, expires)
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_beat = 0.0
        self._left = False  # said bye: stopping, so no more beats
        self._arrived = asyncio.Event()  # set when a probe's socket appears on a replica
        link.on_broadcast(PRESENCE, self._on_presence)
        link.on_state(self._on_state)

    @property
    def replica_id(self) -> str:
        return self.link.replica_id

    async def start(self) -> None:
        me = self.replica_id
        self._listeners = [
            await self.link.subscribe(self.link.subject("replica", me, "route"), self._on_route),
            await self.link.subscribe(self.link.subject("replica", me, "reply"), self._on_reply),
        ]
        self.beat()

    async def run(self) -> None:
        """Beats and housekeeping, for as long as the replica runs."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.beat()
                self.prune()
            except Exception:
                log.exception("cluster presence pass failed")

    # ---- presence ------------------------------------------------------------------------

    def holder(self, probe_id: str) -> str | None:
        """The replica holding ``probe_id``'s socket, if another one does and we can reach it."""
        entry = self.holders.get(probe_id)
        if entry is None or not self.link.connected:
            return None
        if time.monotonic() - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def announce(self, probe_id: str, *, up: bool, since: float) -> None:
        self.link.broadcast(
            PRESENCE, {"op": "up" if up else "down", "probes": [probe_id], "since": since}
        )

    def beat(self) -> None:
        if self._left:
            return  # a beat after the bye would have the others count this replica again
        self._last_beat = time.monotonic()
        probes = list(self.hub.connections)
        for start in range(0, max(len(probes), 1), BEAT_CHUNK):
            chunk = probes[start : start + BEAT_CHUNK]
            self.link.broadcast(PRESENCE, {"op": "beat", "probes": chunk})

    def leave(self) -> None:
        """Tell the others at once that this replica's probes are no longer here."""
        self._left = True
        self.link.broadcast(PRESENCE, {"op": "bye"})

    def prune(self) -> None:
        now = time.monotonic()
        for probe_id in [p for p, (_, seen) in self.holders.items() if now - seen > self.ttl_s]:
            del self.holders[probe_id]
        for replica in [r for r, seen in self.replicas.items() if now - seen > self.ttl_s]:
            del self.replicas[replica]
        for key in [k for k, (_, expires) in self._reply_to.items() if expires < now]:
            del self._reply_to[key]

    def _on_state(self, up: bool) -> None:
        if up:
            # Ask the others for their lists now rather than at their next beat; send ours.
            self.link.broadcast(PRESENCE, {"op": "sync"})
            self.beat()

    def _on_presence(self, origin: str, body: dict[str, Any]) -> None:
        op = body.get("op")
        probes = [str(p) for p in body.get("probes") or ()]
        now = time.monotonic()
        if op == "bye":
            self.replicas.pop(origin, None)
            self._forget_replica(origin)
            return
        self.replicas[origin] = now
        if op == "up":
            since = float(body.get("since") or 0)
            for probe_id in probes:
                self.holders[probe_id] = (origin, now)
                self._replaced_elsewhere(probe_id, since, origin)
            self._arrived.set()
        elif op == "beat":
            for probe_id in probes:
                if probe_id not in self.hub.connections:
                    self.holders[probe_id] = (origin, now)
        elif op == "down":
            for probe_id in probes:
                if self.holders.get(probe_id, ("",))[0] == origin:
                    del self.holders[probe_id]
        elif op == "sync" and now - self._last_beat > 0.5:
            self.beat()

    def _replaced_elsewhere(self, probe_id: str, since: float, origin: str) -> None:
        """A probe has one socket: one older than its new one on another replica is stale
        (half-open after a network change), as the hub treats one replaced locally."""
        conn = self.hub.connections.get(probe_id)
        if conn is None or conn.since >= since or not self.hub.detach(conn):
            return
        log.info("probe moved to another replica", probe_id=probe_id, replica=origin)
        self._spawn(
            conn.close(code=4000, reason="replaced by a newer connection on another replica")
        )

    def _forget_replica(self, replica: str) -> None:
        for probe_id in [p for p, (r, _) in self.holders.items() if r == replica]:
            del self.holders[probe_id]

    # ---- routing -------------------------------------------------------------------------

    def why_not(self, probe_id: str) -> str:
        if not self.link.connected:
            return (
                f"probe {probe_id} is not connected to this replica, and the cluster bus "
                "(NATS) is unreachable, so no other replica can be asked"
            )
        return f"probe {probe_id} is not connected to any replica"

    async def route(self, probe_id: str, envelope: Envelope) -> None:
        """Deliver a signed envelope through the replica holding the probe's socket."""
        from legator.fleet.hub import ProbeNotConnected

        body = {"op": "send", "probe": probe_id, "envelope": envelope.model_dump(mode="json")}
        for attempt in (1, 2):
            holder = self.holder(probe_id)
            if holder is None:
                raise ProbeNotConnected(self.why_not(probe_id))
            answer = await self._ask(holder, probe_id, body)
            if answer.get("ok"):
                return
            if answer.get("code") == "not_here" and attempt == 1:
                # It moved (or left) and the news has not arrived yet: wait for it, once.
                if self.holders.get(probe_id, ("",))[0] == holder:
                    del self.holders[probe_id]
                await self._await_holder(probe_id, MOVE_WAIT_S)
                continue
            raise ProbeNotConnected(
                f"probe {probe_id}: {answer.get('error') or answer.get('code')} "
                f"(on replica {holder})"
            )

    async def close_remote(self, probe_id: str, *, code: int, reason: str) -> None:
        holder = self.holder(probe_id)
        if holder is None:
            return
        body = {"op": "close", "probe": probe_id, "code": code, "reason": reason}
        try:
            await self._ask(holder, probe_id, body)
        except Exception as exc:
            log.warning("could not close a probe's socket on its replica", error=str(exc))

    async def rekey_remote(self, probe_id: str) -> bool:
        """Have the replica holding the probe's socket sign with its current key (its row's)."""
        holder = self.holder(probe_id)
        if holder is None:
            return False
        try:
            answer = await self._ask(holder, probe_id, {"op": "rekey", "probe": probe_id})
        except Exception as exc:
            log.warning("could not refresh a probe's signing key on its replica", error=str(exc))
            return False
        return bool(answer.get("ok"))

    async def _ask(self, holder: str, probe_id: str, body: dict[str, Any]) -> dict[str, Any]:
        from legator.fleet.hub import ProbeNotConnected

        subject = self.link.subject("replica", holder, "route")
        try:
            answer = await self.link.request(subject, body, wait_s=ROUTE_TIMEOUT_S)
        except NoResponder:
            self.replicas.pop(holder, None)
            self._forget_replica(holder)
            raise ProbeNotConnected(
                f"probe {probe_id}: replica {holder}, which held its connection, is gone"
            ) from None
        except NoReply:
            raise ProbeNotConnected(
                f"probe {probe_id}: replica {holder} did not confirm delivery "
                f"within {ROUTE_TIMEOUT_S:.0f}s"
            ) from None
        except ClusterUnavailable as exc:
            raise ProbeNotConnected(
                f"probe {probe_id} is connected to replica {holder}, which this replica "
                f"cannot reach: {exc.message}"
            ) from None
        return answer.body

    async def _await_holder(self, probe_id: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while self.holder(probe_id) is None:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _on_route(self, message: Message) -> None:
        # One task per request: a slow socket must not hold up the others.
        self._spawn(self._route_here(message))

    async def _route_here(self, message: Message) -> None:
        body = message.body
        probe_id = str(body.get("probe", ""))
        conn = self.hub.connections.get(probe_id)
        if conn is None:
            await self.link.respond(message, {"ok": False, "code": "not_here"})
            return
        if body.get("op") == "close":
            if self.hub.detach(conn):
                await conn.close(code=int(body.get("code") or 4000), reason=str(body.get("reason")))
            await self.link.respond(message, {"ok": True})
            return
        if body.get("op") == "rekey":  # a rotated signing key: read from the probe's row
            try:
                ok = await self.hub.refresh_key(probe_id, here_only=True)
            except Exception as exc:
                log.warning("could not refresh a probe's signing key", error=str(exc))
                ok = False
            await self.link.respond(message, {"ok": ok})
            return
        try:
            envelope = Envelope.model_validate(body.get("envelope"))
        except ValidationError:
            await self.link.respond(message, {"ok": False, "code": "malformed"})
            return
        if envelope.type not in SIGNED_TYPES or not _signed_for(envelope, conn.key_hex):
            # Only what a replica signed for this very probe is ever written to its socket.
            log.warning(
                "refused to forward an envelope not signed for the probe",
                probe_id=probe_id,
                origin=message.origin,
                type=envelope.type,
            )
            await self.link.respond(
                message,
                {"ok": False, "code": "bad_signature", "error": "envelope not signed for it"},
            )
            return
        self._expect_reply(message.origin, envelope)
        try:
            await conn.send(envelope)
        except Exception as exc:
            await self.link.respond(
                message, {"ok": False, "code": "send_failed", "error": f"send failed ({exc})"}
            )
            return
        await self.link.respond(message, {"ok": True})

    # ---- replies -------------------------------------------------------------------------

    def _expect_reply(self, origin: str, envelope: Envelope) -> None:
        now = time.monotonic()
        payload = envelope.payload
        if envelope.type in (T_COMMAND, T_FILE_REQUEST):
            key = str(payload.get("request_id", ""))
            timeout = float(payload.get("timeout_s") or 0)
            self._reply_to[key] = (origin, now + timeout + REPLY_TTL_S)
        else:  # acknowledged by envelope id
            self._reply_to[envelope.id] = (origin, now + REPLY_TTL_S)

    def forward_reply(self, key: str, value: Any) -> bool:
        """Send a reply to the replica whose request it answers; False if none is known."""
        entry = self._reply_to.pop(key, None)
        kind = _KIND_OF.get(type(value))
        if entry is None or kind is None:
            return False
        self.link.publish(
            self.link.subject("replica", entry[0], "reply"),
            {"key": key, "kind": kind, "value": value.model_dump(mode="json")},
        )
        return True

    async def _on_reply(self, message: Message) -> None:
        body = message.body
        model = REPLY_MODELS.get(str(body.get("kind")))
        if model is None:
            return
        try:
            value = model.model_validate(body.get("value"))
        except ValidationError:
            log.warning("malformed reply from another replica", origin=message.origin)
            return
        key = str(body.get("key"))
        self.hub.resolve(key, value, forward=False)
        for hook in self.hub.remote_reply_hooks:
            hook(key, value)

    # ---- command output ------------------------------------------------------------------

    def relay_output(self, request_id: str, chunk: OutputChunk | None) -> None:
        try:
            subject = self.link.subject("out", request_id)
        except ValueError:
            return
        body = {"end": True} if chunk is None else {"chunk": chunk.model_dump(mode="json")}
        self.link.publish(subject, body)

    async def follow(self, request_id: str, deliver: Deliver) -> Callable[[], None]:
        """Feed ``deliver`` the output of ``request_id`` relayed by other replicas (None at
        the end) until the returned function is called. Once this returns, the server has
        the subscription, so output stored before is in the database and later output comes
        here."""
        try:
            subject = self.link.subject("out", request_id)
        except ValueError:
            return _nothing

        async def handle(message: Message) -> None:
            if message.body.get("end"):
                deliver(None)
            elif "chunk" in message.body:
                deliver(OutputChunk.model_validate(message.body["chunk"]))

        listener = await self.link.subscribe(subject, handle)
        await self.link.flush()
        return lambda: self._spawn(listener.close())

    # ---- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        counts: dict[str, int] = {}
        for probe_id in self.holders:
            replica = self.holder(probe_id)
            if replica is not None:
                counts[replica] = counts.get(replica, 0) + 1
        replicas = [
            {
                "replica": replica,
                "probes": counts.get(replica, 0),
                "last_heard_s": round(now - seen, 1),
            }
            for replica, seen in sorted(self.replicas.items())
            if now - seen <= self.ttl_s
        ]
        return {**self.link.status(), "replicas": replicas}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _signed_for(envelope: Envelope, key_hex: str) -> bool:
    expected = sign(envelope, key_hex).sig or ""
    return bool(envelope.sig) and hmac.compare_digest(expected, envelope.sig or "")
