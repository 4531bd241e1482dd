"""Prometheus metrics, named as Gateway API Inference Extension users already chart them.

Request metrics are updated on the request path (cached label children, no per-request lookups of
label sets beyond a dict get). Pool gauges are computed only when Prometheus scrapes (`PoolCollector`),
so they cost nothing per request and can feed an HPA (`inference_pool_average_queue_size`,
`inference_pool_average_kv_cache_utilization`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.datalayer.endpoints import EndpointPool

_LATENCY_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
    120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
_SCHEDULER_BUCKETS = (
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
)  # fmt: skip


class PoolCollector(Collector):
    """Pool-level gauges computed at scrape time from the data layer."""

    def __init__(
        self,
        pool: EndpointPool,
        pool_name: str,
        staleness_s: Callable[[int], float],
        extra: Callable[[], dict[str, float]],
    ) -> None:
        self.pool = pool
        self.pool_name = pool_name
        self.staleness_s = staleness_s  # pool size -> age beyond which metrics are stale
        self.extra = extra

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        staleness = self.staleness_s(len(self.pool))
        fresh = [e for e in self.pool if e.reachable and e.metrics.age(now) <= staleness]
        name = self.pool_name
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilisation of the pool",
            labels=["name"],
        )
        queue = GaugeMetricFamily(
            "inference_pool_average_queue_size", "Mean waiting requests per model server", labels=["name"]
        )
        ready = GaugeMetricFamily(
            "inference_pool_ready_pods", "Endpoints with fresh metrics (scraped recently)", labels=["name"]
        )
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Waiting requests per model server",
            labels=["name", "model_server_pod"],
        )
        inflight = GaugeMetricFamily(
            "epp_endpoint_inflight_requests",
            "Requests the picker sent to the endpoint that have not finished",
            labels=["name", "endpoint"],
        )
        if fresh:
            kv.add_metric([name], sum(e.metrics.kv_usage for e in fresh) / len(fresh))
            queue.add_metric([name], sum(e.metrics.waiting for e in fresh) / len(fresh))
        ready.add_metric([name], len(fresh))
        for endpoint in self.pool:
            per_pod.add_metric([name, endpoint.address], endpoint.metrics.waiting)
            inflight.add_metric([name, endpoint.address], endpoint.inflight_requests)
        yield from (kv, queue, ready, per_pod, inflight)
        for metric, value in self.extra().items():
            family = GaugeMetricFamily(metric, metric.replace("_", " "), labels=["name"])
            family.add_metric([name], value)
            yield family


class ExtProcCollector(Collector):
    """The ext_proc servicer's counters (plain ints on the per-message path), read at scrape time: streams,
    messages received (their ratio is the gRPC messages per request, the picker's main per-request cost),
    streams the picker ended after the first response chunk, streams open now; and the asyncio tasks alive
    in the picker's event loop (a leak shows as growth while the streams stay flat; the soak benchmark
    samples it)."""

    def __init__(self, servicer: Any) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.servicer
        yield CounterMetricFamily("epp_extproc_streams", "ext_proc streams (HTTP requests)", s.streams)
        yield CounterMetricFamily("epp_extproc_messages", "ext_proc messages from Envoy", s.messages)
        yield CounterMetricFamily(
            "epp_extproc_streams_stopped_early",
            "Streams the picker ended after the first response chunk (response.follow: first-byte)",
            s.stopped_early,
        )
        yield GaugeMetricFamily("epp_extproc_active_streams", "ext_proc streams open now", s.active_streams)
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # collected outside the event loop (no running loop): nothing to count
            return
        yield GaugeMetricFamily("epp_asyncio_tasks", "asyncio tasks alive in the picker's event loop", tasks)


class RequestMetrics:
    """Per-request counters and histograms (labels: model_name, target_model_name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry  # flow control registers its metrics beside these (FlowControlMetrics)
        labels = ["model_name", "target_model_name"]
        self.requests = Counter(
            "inference_objective_request_total", "Requests the picker routed", labels, registry=registry
        )
        self.errors = Counter(
            "inference_objective_request_error_total",
            "Requests that ended in an error (our rejection or an upstream 5xx/4xx)",
            [*labels, "error_code"],
            registry=registry,
        )
        self.duration = Histogram(
            "inference_objective_request_duration_seconds",
            "From the picker seeing the request to the end of the response (requests the picker followed to "
            "the end: all with response.follow full, every full_sample_every-th in first-byte mode)",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.running = Gauge(
            "inference_objective_running_requests",
            "Requests the picker follows: from the decision to the end of the response, or to its first "
            "chunk where the picker stops following early",
            ["model_name"],
            registry=registry,
        )
        self.scheduler_duration = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to run the scheduling profile for one request",
            buckets=_SCHEDULER_BUCKETS,
            registry=registry,
        )
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds",
            "Time spent in one scheduling plugin",
            ["plugin_name"],
            buckets=_SCHEDULER_BUCKETS,
            registry=registry,
        )
        self._children: dict[Any, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, model: str, target: str) -> None:
        self._child(self.requests, model, target).inc()
        self._child(self.running, model).inc()

    def finished(self, model: str, target: str, seconds: float | None, error_code: str | None) -> None:
        """`seconds` None: the picker stopped following the response early (its duration is unknown)."""
        self._child(self.running, model).dec()
        if seconds is not None:
            self._child(self.duration, model, target).observe(seconds)
        if error_code:
            self._child(self.errors, model, target, error_code).inc()

    def rejected(self, model: str, target: str, code: str) -> None:
        self._child(self.errors, model, target, code).inc()

    def scheduled(self, seconds: float, plugin_seconds: dict[str, float] | None) -> None:
        self.scheduler_duration.observe(seconds)
        if plugin_seconds:
            for name, value in plugin_seconds.items():
                self._child(self.plugin_duration, name).observe(value)


_QUEUE_BUCKETS = (  # upstream's
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_FLOW_LABELS = ["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"]
MAX_FAIRNESS_LABELS = 100
"""Distinct fairness ids given their own label value; later ones are reported as "other" (a client picks
its fairness id: without a cap, one could create unbounded metric series)."""


class FlowControlMetrics(Collector):
    """Flow control (GIE names; labels `fairness_id`, `priority`, `inference_pool`, `model_name`,
    `target_model_name`):

    * `inference_extension_flow_control_request_queue_duration_seconds` (histogram, + `outcome`): time from
      admission to the outcome, for every request while flow control is on (0 for those dispatched at
      once); its `_count` by `outcome` counts the outcomes (Dispatched, RejectedSaturated,
      RejectedCapacity, EvictedTTL, EvictedNoEndpoints, EvictedContextCancelled, ...).
    * `inference_extension_flow_control_queue_size` / `_queue_bytes` (gauges, computed at scrape time):
      requests and body bytes waiting now, per flow and band.
    * `inference_extension_flow_control_pool_saturation` (gauge, `inference_pool`): the gate's level for
      the whole pool (>= 1: requests wait).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        pool_name: str,
        snapshot: Callable[[], list[tuple[str, int, str, str, int, int]]],
        saturation: Callable[[], float],
    ) -> None:
        self.pool_name = pool_name
        self.snapshot = snapshot
        self.saturation = saturation
        self.duration = Histogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time requests spend in the flow-control layer, from admission to their outcome",
            ["fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"],
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, int, str, str, str], Any] = {}
        self._fairness: set[str] = set()
        registry.register(self)

    def fairness_label(self, fairness_id: str) -> str:
        if fairness_id in self._fairness:
            return fairness_id
        if len(self._fairness) < MAX_FAIRNESS_LABELS:
            self._fairness.add(fairness_id)
            return fairness_id
        return "other"

    def record(self, request: Any, outcome: str, seconds: float) -> None:
        """One outcome (`request` is a SchedulingRequest)."""
        key = (request.fairness_id, request.priority, outcome, request.model, request.target_model)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.duration.labels(
                self.fairness_label(request.fairness_id), str(request.priority), outcome, self.pool_name,
                request.model, request.target_model,
            )  # fmt: skip
        child.observe(seconds)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "inference_extension_flow_control_queue_size",
            "Requests waiting in flow control",
            labels=_FLOW_LABELS,
        )
        size_bytes = GaugeMetricFamily(
            "inference_extension_flow_control_queue_bytes",
            "Body bytes of the requests waiting in flow control",
            labels=_FLOW_LABELS,
        )
        totals: dict[tuple[str, str, str, str, str], list[int]] = {}
        for fairness_id, priority, model, target, count, nbytes in self.snapshot():
            key = (self.fairness_label(fairness_id), str(priority), self.pool_name, model, target)
            entry = totals.setdefault(key, [0, 0])
            entry[0] += count
            entry[1] += nbytes
        for key, (count, nbytes) in totals.items():
            size.add_metric(list(key), count)
            size_bytes.add_metric(list(key), nbytes)
        saturation = GaugeMetricFamily(
            "inference_extension_flow_control_pool_saturation",
            "The flow-control gate's saturation of the whole pool (>= 1: requests wait)",
            labels=["inference_pool"],
        )
        saturation.add_metric([self.pool_name], self.saturation())
        yield from (size, size_bytes, saturation)
