"""Fleet Prometheus metrics, created on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from legator.core.metrics import LATENCY_BUCKETS


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Gauge(
            "legator_fleet_probes", "Registered probes by status.", ["status"], registry=registry
        )
        self.sockets = Gauge(
            "legator_fleet_connected_sockets", "Probe WebSockets held open.", registry=registry
        )
        self.commands = Counter(
            "legator_fleet_commands", "Commands by outcome.", ["outcome"], registry=registry
        )
        self.latency = Histogram(
            "legator_fleet_command_duration_seconds",
            "Time from dispatch to result, as seen by the control plane.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.heartbeats = Counter(
            "legator_fleet_heartbeats", "Heartbeats received.", registry=registry
        )
