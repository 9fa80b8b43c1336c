"""`/v1/stream`: Server-Sent Events of state changes, connectivity and ticket events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cityops.api.context import Context, Reader
from cityops.api.http.fields import District
from cityops.api.http.problems import PROBLEM_JSON, Problem
from cityops.api.stream.broadcaster import (
    ResumeRefusedError,
    StreamFilter,
    Subscription,
)
from cityops.common.kinds import Kind

router = APIRouter(prefix="/v1", tags=["stream"])
_MAX_EVENT_ID = 2**53
_PROBLEM = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}


class EventStreamResponse(StreamingResponse):
    """A streaming response that runs `on_close` when it ends, however it ends.

    The subscription is opened by the route (so a refused resume is still a proper 4xx/5xx)
    and released here, outside the body generator: a generator that never starts (the client
    left before the first byte) or is cancelled mid-await has no reliable place to clean up.
    """

    def __init__(self, content: Any, *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the body, then release what it held."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def event_stream(subscription: Subscription, *, heartbeat_s: float) -> AsyncIterator[bytes]:
    """The text/event-stream body: events, and a comment line every `heartbeat_s`."""
    yield b"retry: 3000\n: connected\n\n"
    while True:
        try:
            event = await asyncio.wait_for(subscription.queue.get(), heartbeat_s)
        except TimeoutError:
            yield b": keepalive\n\n"
            continue
        if event is None:
            return
        yield event.render()


@router.get(
    "/stream",
    summary="Live events (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        410: {"description": "Last-Event-ID is further back than a resume replays"},
        503: {
            "description": "Too many resumes at once, or Kafka unavailable (see Retry-After)",
            "content": _PROBLEM,
        },
    },
)
async def stream(
    context: Context,
    _: Reader,
    kind: Annotated[list[Kind], Query(max_length=4)] = [],  # noqa: B006 - FastAPI copies it
    district: Annotated[list[District], Query(max_length=100)] = [],  # noqa: B006
    type: Annotated[  # noqa: A002 - the public query parameter is `type`
        list[Literal["state", "connectivity", "ticket"]], Query(max_length=3)
    ] = [],  # noqa: B006
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    """Events `state` (a newer reading), `connectivity` and `ticket` as they happen.

    Filter with repeated `kind`, `district` and `type` parameters. Each event's id is its
    Kafka timestamp (ms); reconnecting with `Last-Event-ID` resumes after it while Kafka
    still holds the records: at most CITYOPS_API_STREAM_RESUME_MAX_EVENTS records back
    (else 410: reconnect without it) and CITYOPS_API_STREAM_RESUME_MAX resumes at once (else
    503 with Retry-After).
    """
    since_ms = None
    if last_event_id is not None:
        with contextlib.suppress(ValueError):
            since_ms = int(last_event_id)
        if since_ms is None or not 0 <= since_ms <= _MAX_EVENT_ID:
            raise Problem(
                422,
                "Last-Event-ID must be an event id this stream sent",
                problem="validation",
                errors=[{"field": "header.last-event-id", "message": "not an event id"}],
            )
    stream_filter = StreamFilter(
        kinds=frozenset(k.value for k in kind),
        districts=frozenset(district),
        types=frozenset(type),
    )
    broadcaster = context.broadcaster
    try:
        subscription = await broadcaster.open(stream_filter, since_ms=since_ms)
    except ResumeRefusedError as exc:
        if exc.reason == "window":
            raise Problem(410, exc.detail, problem="resume-window-exceeded") from exc
        retry_after = str(context.settings.api_stream_resume_retry_after_s)
        raise Problem(
            503,
            exc.detail,
            problem="stream-busy" if exc.reason == "busy" else "stream-unavailable",
            headers={"Retry-After": retry_after},
        ) from exc
    return EventStreamResponse(
        event_stream(subscription, heartbeat_s=context.settings.api_stream_heartbeat_s),
        on_close=lambda: broadcaster.leave(subscription),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
