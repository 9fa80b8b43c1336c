"""`/v1/tickets`: lists, one ticket with its audit log, operator transitions (A7)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from cityops.api.context import Context, Operator, Reader
from cityops.api.devices.routes import param_problem
from cityops.api.http.fields import District
from cityops.api.http.params import ParamError, decode_cursor, encode_cursor
from cityops.api.http.problems import Problem
from cityops.api.http.responses import json_response
from cityops.api.tickets import store as store_tickets
from cityops.api.tickets.models import TicketDetail, TicketOut, TicketPage, TransitionIn
from cityops.common.kinds import Kind, Priority, TicketStatus
from cityops.common.tickets import TransitionError, check_transition, event_from_rows

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["tickets"])
_MAX_TICKET_ID = 2**63 - 1


def ticket_out(row: Any) -> dict[str, Any]:
    """A ticket row as the public document."""
    document = dict(row)
    document["details"] = orjson.loads(row["details"])
    return document


def transition_action(current: TicketStatus, target: TicketStatus) -> str:
    """The audit-log action of an operator's transition."""
    if current is TicketStatus.RESOLVED and target is TicketStatus.OPEN:
        return "reopened"
    return target.value


@router.get("/tickets", response_model=TicketPage, summary="List tickets")
async def list_tickets(
    *,
    context: Context,
    _: Reader,
    status: TicketStatus | None = None,
    kind: Kind | None = None,
    district: District | None = None,
    department: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    priority: Priority | None = None,
    overdue: bool | None = None,
    device_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Tickets newest first; `overdue=true` lists unresolved tickets past their due time."""
    try:
        before = decode_cursor(cursor, kind=int) if cursor is not None else None
    except ParamError as exc:
        raise param_problem(exc) from exc
    rows = await store_tickets.list_tickets(
        context.pool,
        status=status.value if status else None,
        kind=kind.value if kind else None,
        district=district,
        department=department,
        priority=priority.value if priority else None,
        overdue=overdue,
        device_id=device_id,
        before_id=int(before) if before is not None else None,
        limit=limit,
    )
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"items": [ticket_out(row) for row in page], "next_cursor": next_cursor})


async def _ticket_or_404(context: Context, ticket_id: int) -> Any:
    row = None
    if 1 <= ticket_id <= _MAX_TICKET_ID:
        row = await store_tickets.get_ticket(context.pool, ticket_id=ticket_id)
    if row is None:
        raise Problem(404, f"no ticket {ticket_id}", problem="ticket-not-found")
    return row


@router.get("/tickets/{ticket_id}", response_model=TicketDetail, summary="Get a ticket")
async def get_ticket(context: Context, _: Reader, ticket_id: int) -> dict[str, Any]:
    """One ticket with its audit log."""
    row = await _ticket_or_404(context, ticket_id)
    document = ticket_out(row)
    rows = await store_tickets.transitions(context.pool, ticket_id=ticket_id)
    document["transitions"] = [{**dict(t), "details": orjson.loads(t["details"])} for t in rows]
    return document


@router.post(
    "/tickets/{ticket_id}/transitions",
    response_model=TicketOut,
    summary="Move a ticket to a new status",
    responses={409: {"description": "Stale version, or a move the state machine forbids"}},
)
async def transition_ticket(
    context: Context, principal: Operator, ticket_id: int, body: TransitionIn
) -> dict[str, Any]:
    """Apply an operator's transition; `version` must match (optimistic concurrency)."""
    if not 1 <= ticket_id <= _MAX_TICKET_ID:
        raise Problem(404, f"no ticket {ticket_id}", problem="ticket-not-found")
    try:
        async with context.pool.acquire() as conn, conn.transaction():
            row = await store_tickets.get_ticket(conn, ticket_id=ticket_id, for_update=True)
            if row is None:
                raise Problem(404, f"no ticket {ticket_id}", problem="ticket-not-found")
            if row["version"] != body.version:
                raise Problem(
                    409,
                    f"the ticket is at version {row['version']}, not {body.version}; "
                    "reload it and try again",
                    problem="stale-version",
                    current_version=row["version"],
                    current_status=row["status"],
                )
            current = TicketStatus(row["status"])
            try:
                check_transition(current, body.to)
            except TransitionError as exc:
                raise Problem(
                    409, str(exc), problem="invalid-transition", current_status=current.value
                ) from exc
            ticket, transition = await store_tickets.apply_transition(
                conn,
                ticket_id=ticket_id,
                from_status=current,
                to_status=body.to,
                action=transition_action(current, body.to),
                actor=principal.actor,
                assignee=body.assignee,
                resolution=body.resolution,
                note=body.note,
            )
            # the event commits with the transition (outbox), Kafka gets it after the commit
            await context.publisher.ticket_transition(conn, event_from_rows(ticket, transition))
    except asyncpg.UniqueViolationError as exc:
        # Reopening while the rule already opened a new ticket for the same device and rule.
        raise Problem(
            409,
            "another unresolved ticket exists for this device and rule",
            problem="duplicate-open-ticket",
        ) from exc
    context.metrics.ticket_transitions.labels(body.to.value).inc()
    log.info(
        "ticket transition",
        extra={
            "ticket_id": ticket_id,
            "from_status": current.value,
            "to_status": body.to.value,
            "actor": principal.actor,
        },
    )
    context.publisher.committed()
    return ticket_out(ticket)
