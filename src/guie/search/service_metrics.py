"""What `GET /metrics` exposes, in Prometheus text format (`prometheus-client`, a registry per app):

    guie_http_requests_total{route,method,status}   answers, every one (refusals of the limits included)
    guie_http_request_duration_seconds{route}        latency histogram, from the request's start to its last byte
    guie_search_queries                              query images (or items) per POST /search, histogram
    guie_batch_images                                images per forward of the dynamic batcher, histogram
    guie_batch_refused_total                         requests the batcher's full queue refused (503)
    guie_queue_images                                images waiting for a forward now
    guie_inflight_requests                           requests holding an in-flight slot now
    guie_index_items, guie_index_commit              the served index's size and last commit

Routes are the app's route templates (`/items/{id}`), anything else is `other`: a client cannot grow the label set.
"""
from __future__ import annotations

import re
import time

ROUTES = [("/items/{id}/thumbnail", re.compile(r"^/items/[^/]+/thumbnail$")),
          ("/items/{id}", re.compile(r"^/items/[^/]+$")), ("/static/{name}", re.compile(r"^/static/[^/]+$"))]
PLAIN_ROUTES = {"/", "/health", "/search", "/items", "/duplicates", "/metrics", "/openapi.json"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def route_of(path: str) -> str:
    """The route template a request path belongs to (`other` for anything the app does not serve)."""
    if path in PLAIN_ROUTES:
        return path
    for name, pattern in ROUTES:
        if pattern.match(path):
            return name
    return "other"


class ServiceMetrics:
    """The service's metrics over one index and encoder; `middleware` counts every answer, `exposition()` is the
    body of GET /metrics."""

    def __init__(self, index, encoder, inflight: dict | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("guie_http_requests", "HTTP answers by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("guie_http_request_duration_seconds", "Time from a request's start to its answer's "
                                 "last byte", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queries = Histogram("guie_search_queries", "Query images (or items) per POST /search",
                                 buckets=SIZE_BUCKETS, registry=self.registry)
        Gauge("guie_index_items", "Items in the served index", registry=self.registry).set_function(
            lambda: len(index))
        Gauge("guie_index_commit", "The served index's last commit", registry=self.registry).set_function(
            lambda: index.seq)
        batcher = getattr(encoder, "batcher", None)
        Gauge("guie_queue_images", "Images waiting for a forward", registry=self.registry).set_function(
            lambda: getattr(batcher, "queued", 0))
        self.inflight = inflight if inflight is not None else {"n": 0}
        Gauge("guie_inflight_requests", "Requests holding an in-flight slot", registry=self.registry).set_function(
            lambda: self.inflight["n"])
        if batcher is not None:
            self.registry.register(_BatcherCollector(batcher))
        metrics = self

        class Middleware:
            """ASGI middleware: counts each answer by route and status, and its latency."""

            def __init__(self, app):
                self.app = app

            async def __call__(self, scope, receive, send):
                if scope["type"] != "http":
                    return await self.app(scope, receive, send)
                start, status = time.perf_counter(), [500]

                async def counting_send(message):
                    if message["type"] == "http.response.start":
                        status[0] = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, counting_send)
                finally:
                    route = route_of(scope.get("path", ""))
                    metrics.requests.labels(route, scope.get("method", "?"), str(status[0])).inc()
                    metrics.latency.labels(route).observe(time.perf_counter() - start)

        self.middleware = Middleware

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the metrics in Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BatcherCollector:
    """The dynamic batcher's own counters, read when scraped: images per forward (a histogram), refusals."""

    def __init__(self, batcher):
        self.batcher = batcher

    def collect(self):
        """Prometheus metric families for the batcher's stats now."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        stats = self.batcher.stats
        sizes = dict(getattr(stats, "sizes", {}) or {})
        buckets, below = [], 0
        for edge in SIZE_BUCKETS:
            below = sum(n for size, n in sizes.items() if size <= edge)
            buckets.append((str(float(edge)), below))
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("guie_batch_images", "Images per forward of the dynamic batcher",
                                    buckets=buckets, sum_value=float(sum(s * n for s, n in sizes.items())))
        yield CounterMetricFamily("guie_batch_refused", "Requests refused because the batcher's queue was full (503)",
                                  value=stats.refused)
        yield CounterMetricFamily("guie_batch_forwards", "Forwards the batcher ran", value=stats.forwards)
