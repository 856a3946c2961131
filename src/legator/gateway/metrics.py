"""Prometheus metrics of the gateway, on the app's own registry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from legator.core.metrics import LATENCY_BUCKETS, Labelled

if TYPE_CHECKING:
    from legator.gateway.scheduler import Scheduler
    from legator.gateway.usage import UsageRecord, UsageRecorder

WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _PoolCollector(Collector):
    """Slots and queues read at scrape time, so they are never stale."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        slots = GaugeMetricFamily("legator_gateway_slots", "Slots per model.", labels=["model"])
        used = GaugeMetricFamily(
            "legator_gateway_slots_in_use", "Slots in use per model.", labels=["model"]
        )
        depth = GaugeMetricFamily(
            "legator_gateway_queue_depth", "Requests waiting per model.", labels=["model"]
        )
        for model, pool in list(self.scheduler.pools.items()):
            slots.add_metric([model], pool.parallel)
            used.add_metric([model], pool.in_use)
            depth.add_metric([model], pool.depth)
        yield from (slots, used, depth)


class _UsageCollector(Collector):
    """The usage writer's backlog: rows waiting for the database, and rows it had to drop."""

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "legator_gateway_usage_rows_pending",
            "Usage rows recorded but not yet written to the database.",
            value=self.recorder.waiting,
        )
        yield CounterMetricFamily(
            "legator_gateway_usage_rows_dropped",
            "Usage rows dropped because too many were waiting for the database.",
            value=self.recorder.dropped,
        )
        yield CounterMetricFamily(
            "legator_gateway_usage_rows_refused",
            "Usage rows dropped because the database refused what they hold.",
            value=self.recorder.refused,
        )


class GatewayMetrics:
    def __init__(
        self, registry: CollectorRegistry, scheduler: Scheduler, recorder: UsageRecorder
    ) -> None:
        self.requests = Counter(
            "legator_gateway_requests",
            "Inference requests by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "legator_gateway_tokens",
            "Tokens by model and direction (input, output).",
            ["model", "direction"],
            registry=registry,
        )
        self.wait = Histogram(
            "legator_gateway_queue_wait_seconds",
            "Time requests waited for a slot.",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "legator_gateway_request_duration_seconds",
            "Inference request latency (streams: until the end).",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.forwarded = Counter(
            "legator_gateway_forwarded_requests",
            "Inference requests passed on to the replica that serves the model.",
            ["replica"],
            registry=registry,
        )
        registry.register(_PoolCollector(scheduler))
        registry.register(_UsageCollector(recorder))
        self._requests = Labelled(self.requests)
        self._tokens = Labelled(self.tokens)
        self._wait = Labelled(self.wait)
        self._latency = Labelled(self.latency)

    def observe(self, row: UsageRecord) -> None:
        self._requests(row.model_id, row.endpoint, str(row.status)).inc()
        self._tokens(row.model_id, "input").inc(row.input_tokens)
        self._tokens(row.model_id, "output").inc(row.output_tokens)
        self._wait(row.model_id).observe(row.queued_ms / 1000)
        self._latency(row.model_id, row.endpoint).observe(row.latency_ms / 1000)
