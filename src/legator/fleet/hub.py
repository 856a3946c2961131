"""The WebSocket hub: one socket per probe, signed sends, and replies matched to requests.

This replica's sockets only; routing across replicas (NATS) is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.websockets import WebSocket

from legator.core.errors import ServiceUnavailable
from legator.core.logging import get_logger
from legator.fleet.protocol import Envelope, derive_probe_key, signed

log = get_logger("legator.fleet.hub")
Handler = Callable[[str, Envelope], Awaitable[None]]


class ProbeNotConnected(ServiceUnavailable):
    pass


@dataclass
class Connection:
    probe_id: str
    websocket: WebSocket
    key_hex: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, envelope: Envelope) -> None:
        async with self.lock:
            await self.websocket.send_text(envelope.model_dump_json())


class Hub:
    def __init__(self, master_key: bytes) -> None:
        self.master_key = master_key
        self.connections: dict[str, Connection] = {}
        self._waiters: dict[str, asyncio.Future[Any]] = {}

    def key_for(self, probe_id: str) -> str:
        return derive_probe_key(self.master_key, probe_id)

    def is_connected(self, probe_id: str) -> bool:
        return probe_id in self.connections

    async def attach(self, probe_id: str, websocket: WebSocket) -> Connection:
        """Register a new socket; an older one for the same probe is closed (replaced)."""
        conn = Connection(probe_id, websocket, self.key_for(probe_id))
        old = self.connections.get(probe_id)
        self.connections[probe_id] = conn
        if old is not None:
            with contextlib.suppress(Exception):  # the old socket may already be gone
                await old.websocket.close(code=4000, reason="replaced by a newer connection")
        return conn

    def detach(self, conn: Connection) -> bool:
        """Forget ``conn`` if it is still the current one; True if it was."""
        if self.connections.get(conn.probe_id) is conn:
            del self.connections[conn.probe_id]
            return True
        return False

    async def send(
        self, probe_id: str, type_: str, payload: dict[str, Any] | BaseModel
    ) -> Envelope:
        """Sign ``payload`` with the probe's key and send it."""
        conn = self.connections.get(probe_id)
        if conn is None:
            raise ProbeNotConnected(f"probe {probe_id} is not connected")
        envelope = signed(type_, payload, conn.key_hex)
        await self.send_envelope(probe_id, envelope)
        return envelope

    async def send_envelope(self, probe_id: str, envelope: Envelope) -> None:
        conn = self.connections.get(probe_id)
        if conn is None:
            raise ProbeNotConnected(f"probe {probe_id} is not connected")
        try:
            await conn.send(envelope)
        except Exception as exc:
            raise ProbeNotConnected(f"probe {probe_id}: send failed ({exc})") from None

    def expect(self, key: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        return future

    def resolve(self, key: str, value: Any) -> bool:
        future = self._waiters.pop(key, None)
        if future is None or future.done():
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
        the envelope id, which the probe's ``ack`` names in ``ref``)."""
        conn = self.connections.get(probe_id)
        if conn is None:
            raise ProbeNotConnected(f"probe {probe_id} is not connected")
        envelope = signed(type_, payload, conn.key_hex)
        key = reply_key or envelope.id
        future = self.expect(key)
        try:
            await self.send_envelope(probe_id, envelope)
            return await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise ServiceUnavailable(
                f"probe {probe_id} did not answer the {type_} request within {wait_s:.0f}s"
            ) from None
        finally:
            self.forget(key)

    async def close_all(self) -> None:
        for conn in list(self.connections.values()):
            with contextlib.suppress(Exception):  # already closed
                await conn.websocket.close(code=1012, reason="control plane restarting")
        self.connections.clear()
