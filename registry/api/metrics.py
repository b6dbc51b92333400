"""Prometheus metrics of one application (``GET /metrics``, text exposition format).

Each `create_app` gets its own `prometheus_client.CollectorRegistry` (no import-time state,
so tests can run several apps in a process). What is measured:

=============================================  ===========================================================
``brickyard_http_requests_total``              requests by method, route template and status
``brickyard_http_request_duration_seconds``    latency histogram by method and route template
``brickyard_search_stage_seconds``             search time by stage: ``embed``, ``index``, ``rank``
``brickyard_builds_total``                     builds finished by this server's workers, by outcome
``brickyard_build_duration_seconds``           build time histogram (this server's workers)
``brickyard_compositions``                     compositions by status (``queued`` = queue length)
``brickyard_composition_cache_bytes``          bytes of ready compositions; ``..._budget_bytes``
``brickyard_composition_evictions_total``      compositions evicted to the budget by this server's workers
``brickyard_composition_evicted_bytes_total``  bytes those evictions freed
``brickyard_embedding_child_restarts``         restarts of the embedding child process
=============================================  ===========================================================

Route templates (``/v1/bricks/{name}``), never raw paths, label the requests, so a
scraper cannot be made to create a time series per URL. The composition gauges are read
from the database at scrape time, so every server behind a load balancer reports the
same queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from registry.service import Registry

__all__ = ["Metrics", "MetricsMiddleware"]

_BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600)


class Metrics:
    """The metrics of one application and the hooks that feed them."""

    def __init__(self, registry_of: Any) -> None:
        """``registry_of()`` returns the `Registry` served (it is opened at start-up)."""
        self.collectors = CollectorRegistry()
        self.requests = Counter(
            "brickyard_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.collectors,
        )
        self.latency = Histogram(
            "brickyard_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            registry=self.collectors,
        )
        self.search_stages = Histogram(
            "brickyard_search_stage_seconds",
            "Search time by stage (embed the query, index candidates, rank)",
            ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.collectors,
        )
        self.builds = Counter(
            "brickyard_builds",
            "Builds finished by this server's workers, by outcome",
            ["status"],
            registry=self.collectors,
        )
        self.build_seconds = Histogram(
            "brickyard_build_duration_seconds",
            "Build time of this server's workers",
            buckets=_BUILD_BUCKETS,
            registry=self.collectors,
        )
        self.evictions = Counter(
            "brickyard_composition_evictions",
            "Ready compositions evicted (least recently used first) to keep the cache within its budget",
            registry=self.collectors,
        )
        self.evicted_bytes = Counter(
            "brickyard_composition_evicted_bytes",
            "Bytes freed by evicting compositions",
            registry=self.collectors,
        )
        self.collectors.register(_StateCollector(registry_of))

    def observe_search(self, timings_ms: Mapping[str, float]) -> None:
        """Record the stage timings of one search."""
        for stage, ms in timings_ms.items():
            self.search_stages.labels(stage).observe(ms / 1000)

    def observe_build(self, composition_id: str, seconds: float, status: str, detail: str = "") -> None:
        """Record one finished build (`registry.builds.jobs.WorkerPool`'s ``on_build`` hook)."""
        self.builds.labels(status).inc()
        self.build_seconds.observe(seconds)

    def observe_eviction(self, composition_id: str, size: int) -> None:
        """Record one evicted composition (a `registry.builds.compositions.Compositions` eviction listener)."""
        self.evictions.inc()
        self.evicted_bytes.inc(size)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.collectors), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """Gauges read at scrape time from the database and the embedding child."""

    def __init__(self, registry_of: Any) -> None:
        self.registry_of = registry_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        registry: Registry | None = self.registry_of()
        if registry is None:
            return
        from registry.storage.composition_store import STATUSES

        counts = registry.compositions.store.count_by_status()
        by_status = GaugeMetricFamily("brickyard_compositions", "Compositions by status", labels=["status"])
        for status in STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        cached = sum(size for _, size in registry.compositions.store.ready_by_age())
        yield GaugeMetricFamily("brickyard_composition_cache_bytes", "Bytes of ready compositions", value=cached)
        yield GaugeMetricFamily(
            "brickyard_composition_cache_budget_bytes",
            "Cache budget of ready compositions (least recently used are evicted beyond it)",
            value=registry.settings.compose.cache_bytes,
        )
        child = registry._embed_child  # read without starting one
        restarts = max(child.starts - 1, 0) if child is not None else 0
        yield GaugeMetricFamily(
            "brickyard_embedding_child_restarts", "Restarts of the embedding child process", value=restarts
        )


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
