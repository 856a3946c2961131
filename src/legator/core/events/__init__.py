"""Event bus: in-process pub/sub, and its adapter over the cluster bus (NATS)."""

from legator.core.events.bus import Event, EventBus, InMemoryEventBus, Subscription

__all__ = ["Event", "EventBus", "InMemoryEventBus", "Subscription"]
