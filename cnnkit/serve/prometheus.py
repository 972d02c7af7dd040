"""Serve stage: Prometheus metrics of the service (requests, errors, latency, batch sizes, images).

Kept in a registry of the app's own (several apps can live in one process, as in the tests), and
counted by a pure ASGI middleware.
"""

from __future__ import annotations

import time

class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cnnkit_requests", "HTTP requests.", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.errors = Counter("cnnkit_errors", "Requests answered with a 4xx or 5xx status.", ["endpoint", "status"],
                              registry=self.registry)
        self.latency = Histogram("cnnkit_request_latency_seconds", "Request latency.", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("cnnkit_batch_size", "Images per model call.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.images = Counter("cnnkit_images", "Images predicted.", registry=self.registry)


def exposition(metrics: Metrics) -> tuple[bytes, str]:
    """The metrics in Prometheus's text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


class MeasureRequests:
    """Pure ASGI middleware counting requests, errors and latency per route template.

    (Not ``@app.middleware("http")``: its BaseHTTPMiddleware costs about a millisecond per request.)
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            if status[0] >= 400:
                self.metrics.errors.labels(endpoint, str(status[0])).inc()
