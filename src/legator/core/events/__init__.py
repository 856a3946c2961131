"""Event bus: in-process pub/sub behind a small interface that a NATS adapter can implement."""

from legator.core.events.bus import Event, EventBus, InMemoryEventBus, Subscription

__all__ = ["Event", "EventBus", "InMemoryEventBus", "Subscription"]
