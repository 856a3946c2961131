"""The event bus interface and its in-process implementation.

Topics are dotted names (``probe.connected``); a subscription pattern is a topic, a prefix
ending in ``.*`` or ``*`` for everything. Subscribers get bounded queues: a slow consumer
loses its oldest events (and is told how many) rather than slowing publishers down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from legator.core.db.base import new_id, utcnow


@dataclass(frozen=True)
class Event:
    topic: str
    data: dict[str, Any]
    id: str = field(default_factory=new_id)
    ts: datetime = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "ts": self.ts.isoformat(), "data": self.data}


def topic_matches(pattern: str, topic: str) -> bool:
    if pattern in ("*", topic):
        return True
    return pattern.endswith(".*") and topic.startswith(pattern[:-1])


class Subscription:
    def __init__(self, bus: InMemoryEventBus, patterns: tuple[str, ...], maxsize: int) -> None:
        self._bus = bus
        self.patterns = patterns
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def wants(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.patterns)

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self, wait: float | None = None) -> Event | None:
        """The next event, or None after ``wait`` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class EventBus(Protocol):
    async def publish(self, topic: str, data: dict[str, Any]) -> Event: ...

    def subscribe(self, *patterns: str, maxsize: int = 1000) -> Subscription: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...

    async def close(self) -> None: ...


class InMemoryEventBus:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    async def publish(self, topic: str, data: dict[str, Any]) -> Event:
        event = Event(topic=topic, data=data)
        self.publish_nowait(event)
        return event

    def publish_nowait(self, event: Event) -> None:
        for subscription in list(self._subscriptions):
            if subscription.wants(event.topic):
                subscription.offer(event)

    def subscribe(self, *patterns: str, maxsize: int = 1000) -> Subscription:
        subscription = Subscription(self, patterns or ("*",), maxsize)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    async def close(self) -> None:
        self._subscriptions.clear()
