"""The event bus across replicas: local delivery at once, and a broadcast on the cluster bus
that every other replica delivers to its own subscribers (never back to this one)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from legator.core.cluster import ClusterLink
from legator.core.events.bus import Event, InMemoryEventBus
from legator.core.logging import get_logger

log = get_logger("legator.core.events")
KIND = "event"


class ClusterEventBus(InMemoryEventBus):
    def __init__(self, link: ClusterLink) -> None:
        super().__init__()
        self.link = link
        link.on_broadcast(KIND, self._receive)

    async def publish(self, topic: str, data: dict[str, Any]) -> Event:
        event = Event(topic=topic, data=data)
        self.publish_nowait(event)
        self.link.broadcast(KIND, event.as_dict())
        return event

    def _receive(self, origin: str, body: dict[str, Any]) -> None:
        try:
            event = Event(
                topic=str(body["topic"]),
                data=dict(body["data"]),
                id=str(body["id"]),
                ts=datetime.fromisoformat(str(body["ts"])),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("malformed event from another replica", origin=origin)
            return
        self.publish_nowait(event)
