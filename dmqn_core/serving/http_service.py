"""``dmqn serve``: the cached user states behind an HTTP scoring service (section 2.5), a FastAPI app.

Endpoints (the OpenAPI schema is at /docs and /openapi.json)::

    POST /v1/score          {"user_id", "items"}
                            -> {"run_id", "version", "user_id", "source", "scores": [{"item_id", "probability"}],
                                "unknown_items"}
    POST /v1/score:batch    {"requests": [{"user_id", "items"}, ...]} -> {"run_id", "version", "results": [...]}
    GET  /healthz           the process answers
    GET  /readyz            the model is loaded and the store answers with the served version's export
    GET  /metrics           Prometheus text format
    POST /admin/reload      switch to the run's newer checkpoint once its export has finished

Every error is {"error": CODE, "detail": ONE LINE} with its status: 401 (token), 404 (unknown user under
?missing=error, unknown path), 409 (reload refused), 413 (body too large), 422 (bad request), 503 (the
store does not answer, or the service is not ready), 500 only for a damaged cached state or a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmqn_core.data.prepared import RAW_ID_RANGE
from dmqn_core.errors import DmqnError
from dmqn_core.serving.service import Missing, ScoringService, ServiceError, UserScores
from dmqn_core.workspace import Workspace

SETTINGS_ENV = "DMQN_SERVE_SETTINGS"  # how `dmqn serve --workers W` hands its settings to each worker
log = logging.getLogger("uvicorn.error.dmqn")  # uvicorn's error log: its handlers and its level

Int64 = Annotated[int, Field(strict=True, ge=RAW_ID_RANGE.start, le=RAW_ID_RANGE.stop - 1)]


@dataclass(frozen=True)
class ServeSettings:
    """What a worker needs to build the app; JSON-safe, so that the parent can pass it in the environment
    (the token file's path travels, never the token)."""

    workspace: str
    run_id: str | None = None
    source: str | None = None
    max_items: int = 1000
    max_users: int = 64
    max_body_bytes: int = 1 << 20
    store_timeout: float = 1.0
    watch: float | None = None  # seconds between checks for a newer export; None: POST /admin/reload only
    token_file: str | None = None
    threads: int = 1  # torch threads per worker
    device: str = "auto"  # where CTAM + MLP run (dmqn_core.devices)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


def read_token(path: str) -> str:
    """The bearer token in ``path`` (one line, surrounding whitespace ignored); a DmqnError that never quotes it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise DmqnError(f"cannot read the token file {path}: {reason}") from None
    token = text.strip()
    if not token:
        raise DmqnError(f"the token file {path} is empty")
    if any(c.isspace() for c in token) or not token.isprintable() or not token.isascii():
        raise DmqnError(f"the token file {path} must hold one token of printable ASCII without spaces")
    return token


# ---- the API's types ----


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Int64 = Field(description="Raw user id, as in the log.")
    items: list[Int64] = Field(min_length=1, description="Raw candidate item ids (at most --max-items).")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[ScoreRequest] = Field(min_length=1, description="At most --max-users users.")


class ItemScore(BaseModel):
    item_id: int
    probability: float = Field(description="Click probability; a popularity score when source is popularity.")


class UserResult(BaseModel):
    user_id: int
    source: Literal["model", "popularity"] = Field(
        description="model: the user's cached state; popularity: no cached state, ?missing=popularity."
    )
    scores: list[ItemScore]
    unknown_items: list[int] = Field(
        description="Items not in the run's vocabulary, scored with the unknown-item (padding) embedding."
    )


class ScoreResponse(UserResult):
    run_id: str
    version: str = Field(description="The model version (run id + checkpoint hash) whose states were read.")


class BatchResponse(BaseModel):
    run_id: str
    version: str
    results: list[UserResult]


class ErrorResponse(BaseModel):
    error: str
    detail: str


class ReloadResponse(BaseModel):
    switched: bool
    version: str
    previous_version: str
    detail: str


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    run_id: str
    version: str


# ---- metrics ----


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


# ---- middleware (plain ASGI: cheaper per request than BaseHTTPMiddleware) ----

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def _error_body(status: int, code: str, detail: str) -> JSONResponse:
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
                    await _error_body(413, "body_too_large", too_large)(scope, receive, send)
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


# ---- the app ----


def _validation_reason(exc: RequestValidationError) -> str:
    """The first problem of a request as one line: where it is and what is wrong."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'invalid')})"
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return "the request has no body; send a JSON object"
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _scores(result: UserScores) -> dict[str, Any]:
    return {
        "user_id": result.user_id,
        "source": result.source,
        "scores": [{"item_id": i, "probability": p} for i, p in zip(result.item_ids, result.probabilities)],
        "unknown_items": result.unknown_items,
    }


def _json(content: Any) -> Response:
    # Built here rather than validated against the response model again: the models above document the
    # shape, the service builds it, and a second validation of 100 scores costs more than the scoring.
    return Response(json.dumps(content, allow_nan=False, separators=(",", ":")), media_type="application/json")


def create_app(settings: ServeSettings) -> FastAPI:
    """The app for ``settings``: loads the run and checks the store now, so that a bad run id or an
    unreachable store is a DmqnError before the server starts."""
    torch.set_num_threads(settings.threads)
    token = read_token(settings.token_file) if settings.token_file else None
    service = ScoringService(
        Workspace(settings.workspace), settings.run_id, settings.source, settings.store_timeout, settings.device
    )
    metrics = Metrics()

    def count_lookups(found: int, absent: int) -> None:
        metrics.lookups.labels("hit").inc(found)
        metrics.lookups.labels("miss").inc(absent)

    service.on_lookup = count_lookups
    service.on_store_error = metrics.store_errors.inc

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A few threads: scoring is CPU work on a couple of cores, and more threads only contend for them.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 8
        log.info(
            "serving run %s, version %s, states from %s",
            service.run_id,
            service.current.version,
            service.store_name,
        )
        watcher = asyncio.create_task(_watch(service, metrics, settings.watch)) if settings.watch else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            service.close()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(
        title="dmqn serve",
        summary="DMQN click probabilities from cached user states (CTAM + MLP only).",
        version=service.current.version,
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s: %s", exc.status, exc.code, exc.detail)
        return _error_body(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # FastAPI reads any other body as no JSON at all, which its message would not say.
            return _error_body(422, "invalid_request", "send the body as JSON (Content-Type: application/json)")
        return _error_body(422, "invalid_request", _validation_reason(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body its JSON parser raised on (a number of thousands of digits, past
            # Python's limit on int conversion): bad input like any other, so 422.
            return _error_body(422, "invalid_request", "the body could not be read as JSON")
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        response = _error_body(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    bearer = HTTPBearer(auto_error=False, description="The token of --token-file, when the service has one.")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, token.encode()):
            raise StarletteHTTPException(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    errors = {404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
    missing_query = Query(
        "error", description="A user without a cached state: error (404) or popularity (flagged in the answer)."
    )

    def check_items(n: int, where: str) -> None:
        if n > settings.max_items:
            raise ServiceError(
                422, "invalid_request", f"{where}: {n:,} items, more than the limit of {settings.max_items:,}"
            )

    @app.post("/v1/score", response_model=ScoreResponse, responses=errors, dependencies=[Depends(authorize)])
    async def score(body: ScoreRequest, missing: Missing = missing_query) -> Response:
        """Click probabilities of the candidates for one user, from the user's cached state."""
        check_items(len(body.items), "items")
        served, (result,) = await run_in_threadpool(service.score, [(body.user_id, body.items)], missing)
        return _json({"run_id": served.run_id, "version": served.version, **_scores(result)})

    @app.post("/v1/score:batch", response_model=BatchResponse, responses=errors, dependencies=[Depends(authorize)])
    async def score_batch(body: BatchRequest, missing: Missing = missing_query) -> Response:
        """Many users in one call, all their candidates scored as one batch."""
        if len(body.requests) > settings.max_users:
            raise ServiceError(
                422,
                "invalid_request",
                f"requests: {len(body.requests):,} users, more than the limit of {settings.max_users:,}",
            )
        for n, request in enumerate(body.requests):
            check_items(len(request.items), f"requests.{n}.items")
        pairs = [(r.user_id, r.items) for r in body.requests]
        served, results = await run_in_threadpool(service.score, pairs, missing)
        return _json({"run_id": served.run_id, "version": served.version, "results": [_scores(r) for r in results]})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers (it says nothing about the store: see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, str]:
        """The model is loaded and the store answers with the served version's finished export."""
        await run_in_threadpool(service.ready)
        served = service.current
        return {"status": "ready", "run_id": served.run_id, "version": served.version}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Request counts by status, latency histogram, state hits and misses, store errors (Prometheus text)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses={409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
        dependencies=[Depends(authorize)],
    )
    async def reload() -> dict[str, Any]:
        """Switch to the run's newer checkpoint once its export has finished (409, still serving the old
        version, until then). Under several workers this reloads the worker that answers; --watch reloads each."""
        result = await run_in_threadpool(service.reload)
        if result.switched:
            metrics.reloads.inc()
            log.info("%s", result.detail)
        return asdict(result)

    return app


async def _watch(service: ScoringService, metrics: Metrics, every: float) -> None:
    """Check for a newer finished export every ``every`` seconds; a refused or failed check waits for the next."""
    while True:
        await asyncio.sleep(every)
        try:
            result = await run_in_threadpool(service.reload)
        except ServiceError:
            continue
        if result.switched:
            metrics.reloads.inc()
            log.info("%s", result.detail)


def app_from_env() -> FastAPI:
    """The app of one worker of `dmqn serve --workers W` (uvicorn's factory), from SETTINGS_ENV."""
    return create_app(ServeSettings.from_env())


# ---- running it ----

# Seconds a SIGTERM waits for in-flight requests before closing their connections.
GRACEFUL_SHUTDOWN_S = 30


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a port in use is one line rather than uvicorn's log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise DmqnError(f"cannot listen on {host}:{port}: {reason}") from None
    except (OverflowError, TypeError, socket.gaierror) as exc:
        sock.close()
        raise DmqnError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)  # the workers of --workers W share it
    return sock


def run_server(settings: ServeSettings, host: str, port: int, workers: int = 1, access_log: bool = False) -> None:
    """Serve until SIGTERM or Ctrl-C: in-flight requests finish (up to GRACEFUL_SHUTDOWN_S), the
    listening socket closes at once, so new connections are refused.

    The run is loaded and the store checked before the socket is served: a bad run id, an unreachable
    store or a bad token file is a DmqnError. Under ``workers`` > 1 each worker loads the run itself
    (uvicorn spawns them) and the workers' metrics are summed through a temporary folder.
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    sock = _listen(host, port)
    options = {"log_level": "info", "access_log": access_log, "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S}
    try:
        app = create_app(settings)  # every check, in this process, before anything is served
        if workers == 1:
            server = uvicorn.Server(uvicorn.Config(app, **options))
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises the SIGTERM or SIGINT it shut down for
                pass
            if not server.started:
                raise DmqnError("the server did not start; see the log above")
            return
        app.state.service.close()
        with tempfile.TemporaryDirectory(prefix="dmqn-metrics-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus-client in each worker
            os.environ[SETTINGS_ENV] = settings.to_json()
            config = uvicorn.Config(f"{__name__}:app_from_env", factory=True, workers=workers, **options)
            supervisor = Multiprocess(config, sockets=[sock])
            supervisor.run()
            if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
                raise DmqnError("a worker did not start; see the log above")
    finally:
        sock.close()
