"""The gateway's own Prometheus metrics (GET /metrics; Triton's are on its metrics port).

- `inflight_gateway_requests_total{endpoint, status}`: answered requests by endpoint and HTTP status
  (a stream counts with the status it started with);
- `inflight_gateway_time_to_first_token_seconds{endpoint}`: from the request's arrival to its first token;
- `inflight_gateway_request_duration_seconds{endpoint}`: from arrival to the last byte of the answer;
- `inflight_gateway_open_streams`: SSE streams being sent now.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inflight_gateway_requests", "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "inflight_gateway_time_to_first_token_seconds", "Arrival to first token",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "inflight_gateway_request_duration_seconds", "Arrival to the end of the answer",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.open_streams = Gauge(
            "inflight_gateway_open_streams", "SSE streams open now", registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    """The path for a known endpoint, "other" for anything else (bounded label values)."""
    return path if path in ENDPOINTS else "other"


class MetricsMiddleware:
    """Pure ASGI: counts each HTTP request by endpoint and status, and times it to its last body byte."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope["path"])
        start = time.monotonic()
        scope.setdefault("state", {})["arrival"] = start
        status = 500

        async def send_and_count(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
