"""The WebSocket hub: one socket per probe, signed sends, and replies matched to requests.

It holds this replica's sockets. With several replicas (``cluster`` set, see
``fleet/cluster.py``), a send to a probe held by another replica is signed here and routed
there, a reply with no waiter here goes back to the replica that asked, and ``is_connected``
covers the probes of every replica.

A probe's signing key belongs to one enrolment (``Probe.key_salt``, see
``protocol.derive_probe_key``): a connection signs with the key of the enrolment its probe key
authenticated, a send to another replica's probe with the key of the probe's current row, and
a connection whose enrolment was replaced before it attached is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from starlette.websockets import WebSocket

from legator.core.errors import ServiceUnavailable
from legator.core.logging import get_logger
from legator.fleet.protocol import Envelope, OutputChunk, derive_probe_key, signed
from legator.fleet.schemas import ClusterStatus

if TYPE_CHECKING:
    from legator.fleet.cluster import FleetCluster

log = get_logger("legator.fleet.hub")
Handler = Callable[[str, Envelope], Awaitable[None]]
# The current key salt of a probe, from its row; None when there is no such probe.
SaltSource = Callable[[str], Awaitable[str | None]]
# A probe that stops reading must not hold a sender (and, behind the connection's lock,
# every later sender) for ever.
SEND_TIMEOUT_S = 30.0


class ProbeNotConnected(ServiceUnavailable):
    pass


@dataclass
class Connection:
    probe_id: str
    websocket: WebSocket
    key_hex: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    since: float = field(default_factory=time.time)

    async def send(self, envelope: Envelope) -> None:
        async with self.lock:
            await self.websocket.send_text(envelope.model_dump_json())

    async def close(self, *, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # the socket may already be gone
            await self.websocket.close(code=code, reason=reason)


class Hub:
    def __init__(self, master_key: bytes, salts: SaltSource | None = None) -> None:
        self.master_key = master_key
        # Set by the registry (legator.fleet.registry), which reads the probes' rows.
        self.salts = salts
        self.connections: dict[str, Connection] = {}
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self.cluster: FleetCluster | None = None
        # Called with (key, value) for each reply that came back from another replica.
        self.remote_reply_hooks: list[Callable[[str, Any], None]] = []

    def key_for(self, probe_id: str, salt: str) -> str:
        """The signing key of the probe's enrolment whose salt is ``salt``."""
        return derive_probe_key(self.master_key, probe_id, salt)

    async def current_key(self, probe_id: str) -> str:
        """The signing key of the probe's current enrolment, as its row says now."""
        if self.salts is None:
            raise RuntimeError("the hub has no source of probe key salts")
        salt = await self.salts(probe_id)
        if salt is None:
            raise self.not_connected(probe_id)
        return self.key_for(probe_id, salt)

    def is_connected(self, probe_id: str) -> bool:
        return probe_id in self.connections or (
            self.cluster is not None and self.cluster.holder(probe_id) is not None
        )

    def not_connected(self, probe_id: str) -> ProbeNotConnected:
        if self.cluster is not None:
            return ProbeNotConnected(self.cluster.why_not(probe_id))
        return ProbeNotConnected(f"probe {probe_id} is not connected")

    async def attach(self, probe_id: str, websocket: WebSocket, salt: str) -> Connection | None:
        """Register a new socket, signing with the key of the enrolment (``salt``) that its
        probe key authenticated; an older one for the same probe is closed (replaced).

        None, with the socket closed, when that enrolment is no longer the probe's: it was
        re-enrolled (or its key rotated) between the key check and now, and whoever holds
        the old probe key gets nothing signed with the old signing key."""
        conn = Connection(probe_id, websocket, self.key_for(probe_id, salt))
        old = self.connections.get(probe_id)
        self.connections[probe_id] = conn
        if self.cluster is not None:
            self.cluster.announce(probe_id, up=True, since=conn.since)
        if old is not None:
            await old.close(code=4000, reason="replaced by a newer connection")
        # Looked up after the socket is registered: a re-enrolment that commits from now on
        # finds it and closes it (registry.register); one that committed before shows here.
        try:
            current = salt if self.salts is None else await self.salts(probe_id)
        except BaseException:
            self.detach(conn)
            await conn.close(code=1011, reason="probe key check failed")
            raise
        if current != salt:
            self.detach(conn)
            await conn.close(code=4401, reason="probe re-enrolled")
            return None
        return conn

    async def refresh_key(self, probe_id: str, *, here_only: bool = False) -> bool:
        """After a confirmed key rotation: the probe's connection, on whichever replica holds
        it, signs from now on with the key its row names. False if no replica confirmed it.
        The replica holding it reads the row itself: no key ever travels between replicas."""
        conn = self.connections.get(probe_id)
        if conn is not None:
            conn.key_hex = await self.current_key(probe_id)
            return True
        if here_only or self.cluster is None:
            return False
        return await self.cluster.rekey_remote(probe_id)

    def detach(self, conn: Connection) -> bool:
        """Forget ``conn`` if it is still the current one; True if it was."""
        if self.connections.get(conn.probe_id) is conn:
            del self.connections[conn.probe_id]
            if self.cluster is not None:
                self.cluster.announce(conn.probe_id, up=False, since=conn.since)
            return True
        return False

    async def disconnect(self, probe_id: str, *, code: int, reason: str) -> None:
        """Close the probe's socket, on whichever replica holds it."""
        conn = self.connections.get(probe_id)
        if conn is not None:
            self.detach(conn)
            await conn.close(code=code, reason=reason)
        elif self.cluster is not None:
            await self.cluster.close_remote(probe_id, code=code, reason=reason)

    async def send(
        self, probe_id: str, type_: str, payload: dict[str, Any] | BaseModel
    ) -> Envelope:
        """Sign ``payload`` with the probe's key and send it."""
        conn = self.connections.get(probe_id)
        if conn is None:
            envelope = signed(type_, payload, await self._remote_key(probe_id))
            await self._route(probe_id, envelope)
            return envelope
        envelope = signed(type_, payload, conn.key_hex)
        await self.send_envelope(probe_id, envelope)
        return envelope

    async def send_envelope(self, probe_id: str, envelope: Envelope) -> None:
        conn = self.connections.get(probe_id)
        if conn is None:
            await self._route(probe_id, envelope)
            return
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await conn.send(envelope)
        except TimeoutError:
            raise ProbeNotConnected(
                f"probe {probe_id}: send failed (not taken within {SEND_TIMEOUT_S:.0f}s)"
            ) from None
        except Exception as exc:
            raise ProbeNotConnected(f"probe {probe_id}: send failed ({exc})") from None

    async def _remote_key(self, probe_id: str) -> str:
        """The key for a probe whose socket another replica may hold: that replica signs
        nothing itself and forwards only what is signed with the key of its connection."""
        if self.cluster is None:
            raise ProbeNotConnected(f"probe {probe_id} is not connected")
        return await self.current_key(probe_id)

    async def _route(self, probe_id: str, envelope: Envelope) -> None:
        if self.cluster is None:
            raise ProbeNotConnected(f"probe {probe_id} is not connected")
        await self.cluster.route(probe_id, envelope)

    def expect(self, key: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        return future

    def resolve(self, key: str, value: Any, *, forward: bool = True) -> bool:
        """Wake the waiter for ``key``; with none here, the reply may belong to another
        replica's request (``forward``), and goes there."""
        future = self._waiters.pop(key, None)
        if future is None or future.done():
            if forward and self.cluster is not None:
                self.cluster.forward_reply(key, value)
            return False
        future.set_result(value)
        return True

    def forget(self, key: str) -> None:
        self._waiters.pop(key, None)

    async def call(
        self,
        probe_id: str,
        type_: str,
        payload: dict[str, Any] | BaseModel,
        *,
        reply_key: str | None = None,
        wait_s: float = 30.0,
    ) -> Any:
        """Send a signed request and wait for the reply matched by ``reply_key`` (default:
        the envelope id, which the probe's ``ack`` names in ``ref``); sending and waiting
        together take at most ``wait_s``."""
        conn = self.connections.get(probe_id)
        key_hex = conn.key_hex if conn is not None else await self._remote_key(probe_id)
        envelope = signed(type_, payload, key_hex)
        key = reply_key or envelope.id
        future = self.expect(key)
        sent = False
        try:
            # The send is under the timeout too: a probe that stops reading blocks it (and,
            # behind the connection's lock, every later send to that probe).
            async with asyncio.timeout(wait_s):
                await self.send_envelope(probe_id, envelope)
                sent = True
                return await future
        except TimeoutError:
            what = "did not answer" if sent else "did not take"
            raise ServiceUnavailable(
                f"probe {probe_id} {what} the {type_} request within {wait_s:.0f}s"
            ) from None
        finally:
            self.forget(key)

    def cluster_status(self) -> ClusterStatus:
        local = len(self.connections)
        if self.cluster is None:
            return ClusterStatus(enabled=False, local_probes=local)
        return ClusterStatus(enabled=True, local_probes=local, **self.cluster.status())

    # ---- command output across replicas ------------------------------------------------

    def relay_output(self, request_id: str, chunk: OutputChunk | None) -> None:
        """Offer a command's output chunk (None: its end) to streams on other replicas."""
        if self.cluster is not None:
            self.cluster.relay_output(request_id, chunk)

    async def follow(
        self, request_id: str, deliver: Callable[[OutputChunk | None], None]
    ) -> Callable[[], None]:
        """Receive the output other replicas relay for ``request_id``; call the result to stop."""
        if self.cluster is None:
            return _nothing
        return await self.cluster.follow(request_id, deliver)

    async def close_all(self) -> None:
        if self.cluster is not None:
            self.cluster.leave()
        for conn in list(self.connections.values()):
            await conn.close(code=1012, reason="control plane restarting")
        self.connections.clear()
        if self.cluster is not None:
            await self.cluster.close()


def _nothing() -> None:
    return None
