"""Prometheus metrics of the gateway, in a registry of its own (one per app).

Counted in process: responses by route template, method and status; request latency; the time
an online request waits for its worker (queue + compute, from the gateway's clock); cache hits.
Read from Redis at scrape time: online queue depth, pending stream entries, live workers, and
the counters each worker reports in its heartbeat (images, batches, errors; images / batches is
the mean batch size, as Triton's ``nv_inference_count / nv_inference_exec_count``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from butd.service.backend import Queue
from butd.workers.protocol import Heartbeat

logger = logging.getLogger(__name__)

# Latency buckets, seconds: 1 ms .. 60 s (cache hits are ~1 ms, timeouts 30 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _QueueCollector(Collector):
    """Gauges read from Redis when /metrics is scraped; silent while Redis is down."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            depth = self._queue.queue_depth()
            pending = self._queue.pending_count()
            workers = self._queue.live_workers()
        except Exception as exc:  # a scrape must not fail because Redis is down
            logger.warning("metrics: queue unavailable: %s", exc)
            yield GaugeMetricFamily("butd_redis_up", "1 when Redis answered the scrape", value=0)
            return
        yield GaugeMetricFamily("butd_redis_up", "1 when Redis answered the scrape", value=1)
        yield GaugeMetricFamily(
            "butd_queue_depth", "online requests waiting or being computed", value=depth
        )
        yield GaugeMetricFamily(
            "butd_pending_entries", "stream entries delivered and not acknowledged", value=pending
        )
        yield GaugeMetricFamily(
            "butd_live_workers",
            "workers with a fresh heartbeat and a loaded model",
            value=sum(1 for w in workers if w.loaded),
        )
        yield from _worker_counters(workers)


def _worker_counters(workers: list[Heartbeat]) -> Iterator[CounterMetricFamily]:
    """Per-worker counters from the heartbeats (monotonic while the worker lives)."""
    for name, doc in (
        ("images", "images the worker extracted"),
        ("batches", "batches the worker ran"),
        ("errors", "items the worker failed"),
    ):
        family = CounterMetricFamily(f"butd_worker_{name}", doc, labels=["worker", "device"])
        for w in workers:
            family.add_metric([w.worker_id, w.device], float(getattr(w, name)))
        yield family


class Metrics:
    """The gateway's metrics; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._bound = False
        self.responses = Counter(
            "butd_http_responses",
            "HTTP responses by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "butd_http_request_seconds",
            "time from request start to response, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.online_wait_seconds = Histogram(
            "butd_online_wait_seconds",
            "enqueue to worker answer of an online request (queue + compute)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "butd_cache_hits", "online requests answered from the store", registry=self.registry
        )
        self.refused = Counter(
            "butd_online_refused",
            "online requests refused with 503 because the queue could not answer them in time",
            registry=self.registry,
        )

    def bind(self, queue: Queue) -> None:
        """Read the queue gauges from ``queue`` at scrape time (once per registry)."""
        if not self._bound:
            self.registry.register(_QueueCollector(queue))
            self._bound = True

    def observe_response(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one response (route = the path template, e.g. /v1/jobs/{job_id})."""
        self.responses.labels(route=route, method=method, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        """Text exposition of every metric (queries Redis for the gauges)."""
        return bytes(generate_latest(self.registry))
