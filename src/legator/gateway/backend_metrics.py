"""Prometheus view of managed backends and downloads, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from legator.gateway.hub.downloads import Downloads
    from legator.gateway.supervisor import Supervisor

STATES = ("starting", "ready", "failed", "stopped")


class BackendCollector(Collector):
    def __init__(self, supervisor: Supervisor, downloads: Downloads) -> None:
        self.supervisor = supervisor
        self.downloads = downloads

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            "legator_gateway_backend_state",
            "1 for the state each managed backend is in.",
            labels=["model", "kind", "state"],
        )
        for live in list(self.supervisor.live.values()):
            for name in STATES:
                state.add_metric([live.model_id, live.kind, name], 1 if live.state == name else 0)
        done = GaugeMetricFamily(
            "legator_gateway_download_bytes", "Bytes received by running downloads.", labels=["id"]
        )
        for download_id, received in list(self.downloads.progress.items()):
            done.add_metric([download_id], received)
        yield from (state, done)


def install(registry: CollectorRegistry, supervisor: Supervisor, downloads: Downloads) -> None:
    registry.register(BackendCollector(supervisor, downloads))
