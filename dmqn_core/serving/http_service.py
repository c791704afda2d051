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
import json
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio.to_thread
import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from dmqn_core.errors import DmqnError
from dmqn_core.serving.http_middleware import ASGIApp, BodyLimitMiddleware, Metrics, MetricsMiddleware
from dmqn_core.serving.http_models import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Int64,
    ItemScore,
    ReadyResponse,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
    UserResult,
)
from dmqn_core.serving.http_routes import (
    add_admin_routes,
    add_error_handlers,
    add_probe_routes,
    add_scoring_routes,
    bearer_check,
    log,
)
from dmqn_core.serving.service import ScoringService, ServiceError
from dmqn_core.workspace import Workspace

# The API's types, metrics and middleware live in http_models and http_middleware; their names stay
# importable from here.
__all__ = [
    "SETTINGS_ENV",
    "GRACEFUL_SHUTDOWN_S",
    "ServeSettings",
    "read_token",
    "create_app",
    "app_from_env",
    "run_server",
    "Metrics",
    "ASGIApp",
    "MetricsMiddleware",
    "BodyLimitMiddleware",
    "Int64",
    "ScoreRequest",
    "BatchRequest",
    "ItemScore",
    "UserResult",
    "ScoreResponse",
    "BatchResponse",
    "ErrorResponse",
    "ReloadResponse",
    "ReadyResponse",
]

SETTINGS_ENV = "DMQN_SERVE_SETTINGS"  # how `dmqn serve --workers W` hands its settings to each worker


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
    add_error_handlers(app)
    authorize = bearer_check(token)
    add_scoring_routes(app, service, authorize, settings.max_items, settings.max_users)
    add_probe_routes(app, service, metrics)
    add_admin_routes(app, service, metrics, authorize)
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
