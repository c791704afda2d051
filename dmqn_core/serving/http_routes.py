"""The endpoints of `dmqn serve` by group (scoring, probes, admin) and its error handlers; every error is one
{"error", "detail"} body.

Each group is a function that adds its routes to the app, rather than an APIRouter the app includes:
FastAPI (0.165) keeps an included router as one more level that every request is matched through, and
these routes are the service's hot path."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmqn_core.serving.http_middleware import Metrics, error_body
from dmqn_core.serving.http_models import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    ReadyResponse,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
)
from dmqn_core.serving.service import Missing, ScoringService, ServiceError, UserScores

log = logging.getLogger("uvicorn.error.dmqn")  # uvicorn's error log: its handlers and its level


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


def add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": CODE, "detail": ONE LINE}, FastAPI's and Starlette's own included."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s: %s", exc.status, exc.code, exc.detail)
        return error_body(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # FastAPI reads any other body as no JSON at all, which its message would not say.
            return error_body(422, "invalid_request", "send the body as JSON (Content-Type: application/json)")
        return error_body(422, "invalid_request", _validation_reason(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body its JSON parser raised on (a number of thousands of digits, past
            # Python's limit on int conversion): bad input like any other, so 422.
            return error_body(422, "invalid_request", "the body could not be read as JSON")
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        response = error_body(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response


def bearer_check(token: str | None) -> Callable[..., None]:
    """The dependency that guards the scoring and admin endpoints: a 401 unless the request carries
    ``token`` (compared in constant time); no check without a token."""
    bearer = HTTPBearer(auto_error=False, description="The token of --token-file, when the service has one.")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, token.encode()):
            raise StarletteHTTPException(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    return authorize


def add_scoring_routes(
    app: FastAPI, service: ScoringService, authorize: Callable[..., None], max_items: int, max_users: int
) -> None:
    """POST /v1/score and /v1/score:batch."""
    errors: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
    missing_query = Query(
        "error", description="A user without a cached state: error (404) or popularity (flagged in the answer)."
    )

    def check_items(n: int, where: str) -> None:
        if n > max_items:
            raise ServiceError(422, "invalid_request", f"{where}: {n:,} items, more than the limit of {max_items:,}")

    @app.post("/v1/score", response_model=ScoreResponse, responses=errors, dependencies=[Depends(authorize)])
    async def score(body: ScoreRequest, missing: Missing = missing_query) -> Response:
        """Click probabilities of the candidates for one user, from the user's cached state."""
        check_items(len(body.items), "items")
        served, (result,) = await run_in_threadpool(service.score, [(body.user_id, body.items)], missing)
        return _json({"run_id": served.run_id, "version": served.version, **_scores(result)})

    @app.post("/v1/score:batch", response_model=BatchResponse, responses=errors, dependencies=[Depends(authorize)])
    async def score_batch(body: BatchRequest, missing: Missing = missing_query) -> Response:
        """Many users in one call, all their candidates scored as one batch."""
        if len(body.requests) > max_users:
            raise ServiceError(
                422,
                "invalid_request",
                f"requests: {len(body.requests):,} users, more than the limit of {max_users:,}",
            )
        for n, request in enumerate(body.requests):
            check_items(len(request.items), f"requests.{n}.items")
        pairs = [(r.user_id, r.items) for r in body.requests]
        served, results = await run_in_threadpool(service.score, pairs, missing)
        return _json({"run_id": served.run_id, "version": served.version, "results": [_scores(r) for r in results]})


def add_probe_routes(app: FastAPI, service: ScoringService, metrics: Metrics) -> None:
    """GET /healthz, /readyz and /metrics: what a load balancer and Prometheus ask."""

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


def add_admin_routes(app: FastAPI, service: ScoringService, metrics: Metrics, authorize: Callable[..., None]) -> None:
    """POST /admin/reload."""

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
