"""The FastAPI application factory: routes, problem+json errors, request metrics, health."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cityops.api.context import ApiContext
from cityops.api.devices import routes as routes_devices
from cityops.api.districts import routes as routes_districts
from cityops.api.http.problems import PROBLEM_JSON, install_problem_handlers, problem_body
from cityops.api.keys import routes as routes_keys
from cityops.api.metrics import ApiMetrics
from cityops.api.stream import routes as routes_stream
from cityops.api.tickets import routes as routes_tickets

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


_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
# Every JSON body is small (a device, a transition, a key); imports set their own limit.
MAX_JSON_BODY_BYTES = 64 * 1024
_ERRORS = {
    "400": "The body could not be parsed (not JSON, or not the declared format)",
    "401": "No valid API key",
    "403": "The API key lacks the scope",
    "404": "Not found",
    "409": "Conflict",
    "413": "Content too large",
    "415": "Unsupported media type",
    "422": "Invalid request: `errors` names each field and why",
}


def problem_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Document every error of every operation as application/problem+json."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = _PROBLEM_SCHEMA
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            codes = {"422"}
            if operation.get("security"):
                codes |= {"401", "403"}
            if "{" in path:
                codes.add("404")
            if "requestBody" in operation:
                codes.add("400")
            if path.endswith(":import"):
                codes |= {"413", "415"}
            if method == "post" and not path.endswith(":import"):
                codes.add("409")  # taken names / ids, stale versions
            codes |= {code for code in responses if code.startswith("4")}
            for code in codes:
                entry = responses.setdefault(code, {"description": _ERRORS.get(code, "Error")})
                entry["content"] = problem
    return schema


class BodyLimit:
    """ASGI middleware: 413 problem+json for bodies over the limit (declared or streamed).

    JSON bodies are small; `:import` routes get the import limit.
    """

    def __init__(self, app: ASGIApp, *, json_limit: int, import_limit: int) -> None:
        self._app = app
        self._json_limit = json_limit
        self._import_limit = import_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse early on Content-Length, count the bytes of a streamed body."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self._import_limit if scope["path"].endswith(":import") else self._json_limit
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                body = problem_body(
                    status=413,
                    title="Content too large",
                    detail=f"the request body is larger than {limit} bytes",
                    problem="content-too-large",
                    instance=scope["path"],
                )
                response = Response(orjson.dumps(body), 413, media_type=PROBLEM_JSON)
                await response(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing unchanged (any
                    # other error there becomes a 400) and reaches the problem+json handler.
                    raise StarletteHTTPException(
                        413, f"the request body is larger than {limit} bytes"
                    )
            return message

        await self._app(scope, counted, send)


class InputGuard:
    """ASGI middleware: 422 problem+json for a NUL character in the path or a query parameter.

    PostgreSQL cannot store or compare text with NUL, and `%00` reaches every route through
    path and query parameters; refusing it here covers them all. (Lone surrogates cannot
    arrive this way: percent-decoding replaces invalid UTF-8.) Bodies are checked by the
    field types of `fields.py`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on unless its path or query holds a NUL."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        field = None
        if "\x00" in scope["path"]:
            field = "path"
        elif b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            field = next((f"query.{n}" for n, v in pairs if "\x00" in n + v), "query")
        if field is None:
            await self._app(scope, receive, send)
            return
        body = problem_body(
            status=422,
            title="Invalid request",
            detail=f"{field}: contains a NUL character (%00)",
            problem="validation",
            instance=scope["path"].replace("\x00", "%00"),
            errors=[{"field": field, "message": "contains a NUL character (%00)"}],
        )
        response = Response(orjson.dumps(body), 422, media_type=PROBLEM_JSON)
        await response(scope, receive, send)


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

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
    )
    async def metrics() -> Response:
        """Prometheus text exposition of this replica's metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_openapi(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented customisation
    app.add_middleware(
        BodyLimit,
        json_limit=MAX_JSON_BODY_BYTES,
        import_limit=context.settings.api_import_max_bytes,
    )
    app.add_middleware(InputGuard)
    app.add_middleware(RequestMetrics, metrics=context.metrics)
    return app
