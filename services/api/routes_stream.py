"""`/v1/stream`: Server-Sent Events of state changes, connectivity and ticket events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from cityops.api.context import Context, Reader
from cityops.api.models import District
from cityops.api.problems import Problem
from cityops.api.stream import Broadcaster, StreamFilter
from cityops.common.kinds import Kind

router = APIRouter(prefix="/v1", tags=["stream"])
_MAX_EVENT_ID = 2**53


async def event_stream(
    broadcaster: Broadcaster,
    stream_filter: StreamFilter,
    *,
    since_ms: int | None,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """The text/event-stream body: events, and a comment line every `heartbeat_s`."""
    async with broadcaster.subscribe(stream_filter, since_ms=since_ms) as subscription:
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
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
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
    still holds the records.
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
    body = event_stream(
        context.broadcaster,
        stream_filter,
        since_ms=since_ms,
        heartbeat_s=context.settings.api_stream_heartbeat_s,
    )
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
