"""Server-sent events: the live event stream."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from legator.core.auth.permissions import Permission as P
from legator.core.auth.principal import Principal
from legator.core.errors import BadRequest
from legator.core.http.deps import core_of
from legator.core.http.live import draining, still_allowed, stream_place

router = APIRouter(prefix="/api/v1", tags=["events"])
# How often a stream checks its credential again, at most (a busy stream checks at that pace).
RECHECK_S = 2.0
_PATTERN = re.compile(r"^(\*|[a-z0-9_]+(\.[a-z0-9_]+)*(\.\*)?)\Z")


def topic_patterns(
    topics: str = Query("*", description="Comma-separated topics or prefixes like 'probe.*'."),
) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in topics.split(",") if p.strip())
    bad = [p for p in patterns if not _PATTERN.match(p)]
    if bad or not patterns:
        raise BadRequest(f"bad topic pattern: {', '.join(bad) or '(empty)'}")
    return patterns


@router.get("/events", response_class=EventSourceResponse)
async def stream_events(
    request: Request,
    patterns: tuple[str, ...] = Depends(topic_patterns),
    _holder: Principal = stream_place("event", P.EVENTS_READ, exempt=P.USERS_WRITE),
) -> AsyncIterator[ServerSentEvent]:
    """Live events as they happen (``event:`` is the topic, ``data:`` the JSON event). The
    stream ends once its credential no longer holds (revoked, signed out, disabled)."""
    with core_of(request).events.subscribe(*patterns) as subscription:
        checked = time.monotonic()
        while not draining(request) and not await request.is_disconnected():
            event = await subscription.get(wait=1.0)
            if event is not None:
                yield ServerSentEvent(data=event.as_dict(), event=event.topic, id=event.id)
            if time.monotonic() - checked >= RECHECK_S:
                if await still_allowed(request, P.EVENTS_READ) is None:
                    return
                checked = time.monotonic()
