"""The FastAPI application factory: routes, problem+json errors, request metrics, health."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cityops.api import routes_devices, routes_districts, routes_keys, routes_stream, routes_tickets
from cityops.api.context import ApiContext
from cityops.api.metrics import ApiMetrics
from cityops.api.problems import install_problem_handlers

_DESCRIPTION = """
The live city: devices with their latest state, readings history, maintenance tickets,
district KPIs and a live event stream. Authenticate with `Authorization: Bearer <key>`;
scopes `read` < `operate` (ticket transitions) < `admin` (devices, keys).
Errors are RFC 9457 `application/problem+json`.
"""


class RequestMetrics:
    """ASGI middleware: request count and latency by route template (never the raw path)."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and count it under its route template."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self._metrics.requests.labels(template, method, str(status)).inc()
            self._metrics.request_seconds.labels(template, method).observe(
                time.perf_counter() - started
            )


def create_app(context: ApiContext, *, registry: CollectorRegistry) -> FastAPI:
    """Build the application around its collaborators (no globals)."""
    app = FastAPI(
        title="cityops API",
        version="1",
        description=_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.context = context
    install_problem_handlers(app)
    for module in (routes_devices, routes_tickets, routes_districts, routes_keys, routes_stream):
        app.include_router(module.router)

    @app.get("/healthz", tags=["operations"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness (database and Kafka)",
        responses={503: {"description": "A dependency is not ready"}},
    )
    async def readyz() -> Response:
        """200 when PostgreSQL and Kafka answer, else 503 with the failing checks."""
        checks = await context.readiness()
        ready = all(checks.values())
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        return Response(
            orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics(_: Request) -> Response:
        """Prometheus text exposition of this replica's metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetrics, metrics=context.metrics)
    return app
