"""Server-sent events: the live event stream."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from legator.core.auth.permissions import Permission
from legator.core.errors import BadRequest
from legator.core.http.deps import core_of, require

router = APIRouter(prefix="/api/v1", tags=["events"])
_PATTERN = re.compile(r"^(\*|[a-z0-9_]+(\.[a-z0-9_]+)*(\.\*)?)\Z")


def topic_patterns(
    topics: str = Query("*", description="Comma-separated topics or prefixes like 'probe.*'."),
) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in topics.split(",") if p.strip())
    bad = [p for p in patterns if not _PATTERN.match(p)]
    if bad or not patterns:
        raise BadRequest(f"bad topic pattern: {', '.join(bad) or '(empty)'}")
    return patterns


@router.get(
    "/events", response_class=EventSourceResponse, dependencies=[require(Permission.EVENTS_READ)]
)
async def stream_events(
    request: Request, patterns: tuple[str, ...] = Depends(topic_patterns)
) -> AsyncIterator[ServerSentEvent]:
    """Live events as they happen (``event:`` is the topic, ``data:`` the JSON event)."""
    with core_of(request).events.subscribe(*patterns) as subscription:
        while not await request.is_disconnected():
            event = await subscription.get(wait=1.0)
            if event is not None:
                yield ServerSentEvent(data=event.as_dict(), event=event.topic, id=event.id)
