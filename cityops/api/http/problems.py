"""RFC 9457 problem+json for every error the API returns; bad input is a 4xx, never a 500."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://cityops.dev/problems/"
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):  # noqa: N818 - it is an RFC 9457 problem, not an "Error"
    """Raise anywhere in a request to answer with a problem+json document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        problem: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problem = problem or _TITLES.get(status, "error").lower().replace(" ", "-")
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extensions = extensions


def problem_body(
    *, status: int, title: str, detail: str, problem: str, instance: str, **extensions: Any
) -> dict[str, Any]:
    """The problem document (RFC 9457 members plus extensions)."""
    body: dict[str, Any] = {
        "type": _TYPE_BASE + problem,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    body.update(extensions)
    return body


def problem_response(
    request: Request,
    *,
    status: int,
    detail: str,
    problem: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response:
    """A problem+json response."""
    title = title or _TITLES.get(status, "Error")
    body = problem_body(
        status=status,
        title=title,
        detail=detail,
        problem=problem or title.lower().replace(" ", "-"),
        instance=request.url.path,
        **extensions,
    )
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """Pydantic/FastAPI validation errors as `{field, message}` pairs a person can act on."""
    out = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        out.append({"field": location or "body", "message": str(error.get("msg", "invalid"))})
    return out


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as problem+json."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(
            request,
            status=exc.status,
            detail=exc.detail,
            problem=exc.problem,
            title=exc.title,
            headers=exc.headers,
            **exc.extensions,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = field_errors(exc.errors())
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem_response(
            request,
            status=422,
            detail=detail or "the request is not valid",
            problem="validation",
            errors=errors,
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(
            request,
            status=exc.status_code,
            detail=str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", extra={"path": request.url.path, "error": type(exc).__name__})
        return problem_response(request, status=500, detail="an unexpected error occurred")

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
