"""Streams that stay open (server-sent events): each holds a place, bounded per holder and in
all; its credential is checked again as it goes, since it outlives the moment it was
authorised (a key revoked, a session signed out or a user disabled ends it); and it ends when
the server begins to shut down, which would otherwise wait for it."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import AppError, TooManyRequests
from legator.core.http.deps import authenticate, require
from legator.core.http.protocol import DRAINING_EXTENSION

# Streams one user (or key without a user) may hold open of each kind on a replica: a few
# browser tabs and a script; and all non-admins together.
PER_HOLDER = 8
TOTAL = 1000


class LiveStreams:
    """The streams of one kind open on this replica, counted per holder (a user, or a key
    without one). Each holds a connection and a few tasks, so one holder may keep only
    ``per_holder`` of them, and non-admins together ``total``: an admin's dashboard still
    opens when others have taken every place."""

    def __init__(self, kind: str, *, per_holder: int, total: int) -> None:
        self.kind = kind
        self.per_holder = per_holder
        self.total = total
        self._by_holder: Tally[str] = Tally()
        self.open = 0

    def _refusal(self, holder: str, *, admin: bool) -> str | None:
        if self._by_holder[holder] >= self.per_holder:
            return (
                f"{self.per_holder} {self.kind} streams are already open for you; "
                "close one (another tab or client) first"
            )
        if not admin and self.open >= self.total:
            return f"this server already has {self.total} {self.kind} streams open"
        return None

    @contextmanager
    def hold(self, holder: str, *, admin: bool) -> Iterator[None]:
        """A place for one stream of ``holder`` while the block runs; 429 when none is left."""
        refusal = self._refusal(holder, admin=admin)
        if refusal is not None:
            raise TooManyRequests(refusal, headers={"Retry-After": "10"})
        self._by_holder[holder] += 1
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            self._by_holder[holder] -= 1
            if not self._by_holder[holder]:
                del self._by_holder[holder]


def _streams(conn: HTTPConnection, kind: str) -> LiveStreams:
    registry: dict[str, LiveStreams] = conn.app.state.__dict__.setdefault("live_streams", {})
    if kind not in registry:
        registry[kind] = LiveStreams(kind, per_holder=PER_HOLDER, total=TOTAL)
    return registry[kind]


def stream_place(kind: str, permission: Permission, *, exempt: Permission) -> Any:
    """A dependency: the caller (who needs ``permission``), holding a place among the open
    streams of ``kind`` until its stream ends; 429 when none is left. Holders of ``exempt``
    (the kind's admins) are not counted against the total."""

    async def hold(
        conn: HTTPConnection, principal: Principal = require(permission)
    ) -> AsyncIterator[Principal]:
        holder = principal.user_id or principal.key_id or principal.username
        with _streams(conn, kind).hold(holder, admin=principal.can(exempt)):
            yield principal

    return Depends(hold)


async def still_allowed(conn: HTTPConnection, permission: Permission) -> Principal | None:
    """The stream's own credential authenticated again, now: None once its key is revoked,
    its session signed out or expired, or its user disabled or left without ``permission``."""
    conn.state.principal = None  # not the one cached when the stream opened
    try:
        principal = await authenticate(conn)
    except AppError:
        return None
    return principal if principal.can(permission) else None


def draining(conn: HTTPConnection) -> bool:
    """Whether the server has begun to shut down (under `legator serve`'s protocol)."""
    event: asyncio.Event | None = conn.scope.get("extensions", {}).get(DRAINING_EXTENSION)
    return event is not None and event.is_set()


async def pause(conn: HTTPConnection, seconds: float) -> bool:
    """Wait ``seconds``; False, at once, if the server begins to shut down meanwhile."""
    event: asyncio.Event | None = conn.scope.get("extensions", {}).get(DRAINING_EXTENSION)
    if event is None:
        await asyncio.sleep(seconds)
        return True
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return True
    return False
