"""What wraps every request of `dmqn serve`: its Prometheus metrics and the body-size limit, as plain ASGI
middleware (cheaper per request than Starlette's BaseHTTPMiddleware)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException


class Metrics:
    """The service's Prometheus metrics. Under several workers (PROMETHEUS_MULTIPROC_DIR set by `dmqn
    serve`) each process writes its values to that folder and /metrics sums them over the workers."""

    ENDPOINTS = ("/v1/score", "/v1/score:batch", "/healthz", "/readyz", "/metrics", "/admin/reload")

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dmqn_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "dmqn_request_seconds",
            "Time from request to response, by endpoint.",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.in_flight = Gauge(
            "dmqn_requests_in_flight", "Requests being answered.", registry=r, multiprocess_mode="livesum"
        )
        self.lookups = Counter("dmqn_state_lookups", "User states looked up, by result.", ["result"], registry=r)
        self.store_errors = Counter("dmqn_store_errors", "Store calls that failed or timed out.", registry=r)
        self.reloads = Counter("dmqn_reloads", "Switches to a newer model version.", registry=r)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def error_body(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in Metrics.ENDPOINTS else "other"  # unknown paths share one label
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        loop = asyncio.get_running_loop()
        started = loop.time()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(loop.time() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()


class BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, else while a chunked body arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is over the limit of {self.limit:,} bytes (--max-body-bytes)"
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await error_body(413, "body_too_large", too_large)(scope, receive, send)
                    return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # An HTTPException: FastAPI passes it on from the body's parsing, where it makes others a 400.
                raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)
