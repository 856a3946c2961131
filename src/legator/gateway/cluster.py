"""The gateway's state held in memory (catalogue, scheduler settings, the active reservation,
each user's recent tokens) kept in step across replicas. A replica that writes one part tells
the others on the cluster bus, and they read that part again from the shared database. NATS
may drop a message (core NATS delivers at most once, and nothing while a replica is cut off),
so every replica also reads every part again after each reconnection, tells the others to do
the same (its own messages may have been lost while it was cut off), and reads the small parts
at a slow interval.

Usage travels differently, since it changes with every request: each batch of usage rows a
replica writes is announced as tokens per user, which the others add to their fairness
window; the window is read again from the database only after a reconnection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, get_args

from legator.core.cluster import ClusterLink
from legator.core.logging import get_logger

log = get_logger("legator.gateway.cluster")
KIND = "gateway"
Part = Literal["catalog", "settings", "reservations", "usage"]
PARTS: frozenset[str] = frozenset(get_args(Part))
# Read again every RESYNC_INTERVAL_S; not usage: an hour of usage rows is too many to read
# that often, and the announcements keep it current.
PERIODIC: frozenset[str] = PARTS - {"usage"}
UsageHandler = Callable[[dict[str, int]], None]
RESYNC_INTERVAL_S = 30.0
RETRY_S = 1.0


class GatewaySync:
    def __init__(
        self,
        link: ClusterLink,
        reload: Callable[[Part], Awaitable[None]],
        on_usage: UsageHandler | None = None,
    ) -> None:
        self.link = link
        self._reload = reload
        self._on_usage = on_usage
        self._due: set[Part] = set()
        self._task: asyncio.Task[None] | None = None
        link.on_broadcast(KIND, self._receive)
        link.on_state(self._on_state)

    def changed(self, part: Part) -> None:
        """This replica wrote ``part``: the others read it again."""
        self.link.broadcast(KIND, {"parts": [part]})

    def used(self, tokens_by_user: dict[str, int]) -> None:
        """This replica billed these tokens (rows now in the database): the others count them."""
        if tokens_by_user:
            self.link.broadcast(KIND, {"usage": tokens_by_user})

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
            self._schedule(PERIODIC)

    def _receive(self, origin: str, body: dict[str, object]) -> None:
        if "usage" in body:
            self._receive_usage(origin, body["usage"])
            return
        parts = body.get("parts")
        if (
            not isinstance(parts, list)
            or not parts
            or not all(isinstance(part, str) and part in PARTS for part in parts)
        ):
            log.warning("malformed gateway change from another replica", origin=origin)
            return
        self._schedule(parts)

    def _receive_usage(self, origin: str, usage: object) -> None:
        if not isinstance(usage, dict) or not all(
            isinstance(user, str) and type(tokens) is int and tokens > 0
            for user, tokens in usage.items()
        ):
            log.warning("malformed usage from another replica", origin=origin)
            return
        if self._on_usage is not None:
            self._on_usage(usage)

    def _on_state(self, up: bool) -> None:
        if up:
            self._schedule(PARTS)
            self.link.broadcast(KIND, {"parts": sorted(PERIODIC)})
            # Its own message: a replica of an earlier version, which knows no "usage" part,
            # drops only this one.
            self.link.broadcast(KIND, {"parts": ["usage"]})

    def _schedule(self, parts: frozenset[str] | list[str]) -> None:
        self._due.update(parts)  # type: ignore[arg-type]
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._apply())

    async def _apply(self) -> None:
        """One reload at a time; parts asked for meanwhile are read once after it."""
        while self._due:
            part = min(self._due)
            self._due.discard(part)
            try:
                await self._reload(part)
            except Exception:
                log.exception("reading the gateway's state again failed; retrying", part=part)
                self._due.add(part)
                await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
