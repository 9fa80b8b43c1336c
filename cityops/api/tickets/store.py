"""SQL of the ticket resources: lists, one ticket with its audit log, operator transitions."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from cityops.api.db import Conn, Executor, Params
from cityops.common.kinds import TicketStatus

TICKET_COLUMNS = """
    t.id, t.device_id, t.kind, t.district, t.rule, t.priority, t.department, t.status,
    t.opened_at, t.due_at, t.acknowledged_at, t.resolved_at, t.closed_at, t.assignee,
    t.occurrences, t.last_seen_at, t.details::text AS details, t.resolution, t.escalations,
    t.version,
    (t.status IN ('open', 'acknowledged', 'in_progress') AND t.due_at < now()) AS overdue
"""
_UNRESOLVED = "t.status IN ('open', 'acknowledged', 'in_progress')"


async def list_tickets(
    conn: Executor,
    *,
    status: str | None,
    kind: str | None,
    district: str | None,
    department: str | None,
    priority: str | None,
    overdue: bool | None,
    device_id: str | None,
    before_id: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    """A page of tickets, newest first; fetches limit + 1 to see if more follow."""
    where: list[str] = []
    param = Params()

    for column, value in (
        ("status", status),
        ("kind", kind),
        ("district", district),
        ("department", department),
        ("priority", priority),
        ("device_id", device_id),
    ):
        if value is not None:
            where.append(f"t.{column} = {param(value)}")
    if overdue is True:
        where.append(f"{_UNRESOLVED} AND t.due_at < now()")
    elif overdue is False:
        where.append(f"NOT ({_UNRESOLVED} AND t.due_at < now())")
    if before_id is not None:
        where.append(f"t.id < {param(before_id)}")
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {TICKET_COLUMNS} FROM tickets t {clause} ORDER BY t.id DESC "  # noqa: S608
        f"LIMIT {param(limit + 1)}",
        *param.values,
    )
    return rows


async def get_ticket(
    conn: Executor, *, ticket_id: int, for_update: bool = False
) -> asyncpg.Record | None:
    """One ticket, optionally locked for a transition."""
    lock = " FOR UPDATE" if for_update else ""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {TICKET_COLUMNS} FROM tickets t WHERE t.id = $1{lock}",  # noqa: S608
        ticket_id,
    )
    return row


async def transitions(conn: Executor, *, ticket_id: int) -> list[asyncpg.Record]:
    """The audit log of a ticket, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT id, at, action, from_status, to_status, from_priority, to_priority, actor,
               version, details::text AS details
        FROM ticket_transitions WHERE ticket_id = $1 ORDER BY id
        """,
        ticket_id,
    )
    return rows


async def apply_transition(
    conn: Conn,
    *,
    ticket_id: int,
    from_status: TicketStatus,
    to_status: TicketStatus,
    action: str,
    actor: str,
    assignee: str | None,
    resolution: str | None,
    note: str | None,
) -> tuple[asyncpg.Record, asyncpg.Record]:
    """Move a locked ticket to `to_status`, bump its version, append the audit row.

    Returns (ticket row, transition row).
    """
    ticket = await conn.fetchrow(
        f"""
        UPDATE tickets t SET
            status = $2,
            version = t.version + 1,
            assignee = coalesce($3, t.assignee),
            acknowledged_at = CASE WHEN $2 IN ('acknowledged', 'in_progress')
                                   THEN coalesce(t.acknowledged_at, now())
                                   ELSE t.acknowledged_at END,
            resolved_at = CASE WHEN $2 = 'resolved' THEN now()
                               WHEN $2 = 'open' THEN NULL ELSE t.resolved_at END,
            resolution = CASE WHEN $2 = 'resolved' THEN coalesce($4, 'manual')
                              WHEN $2 = 'open' THEN NULL ELSE t.resolution END,
            closed_at = CASE WHEN $2 = 'closed' THEN now() ELSE t.closed_at END
        WHERE t.id = $1
        RETURNING {TICKET_COLUMNS}
        """,  # noqa: S608 - constant
        ticket_id,
        to_status.value,
        assignee,
        resolution,
    )
    assert ticket is not None, "the caller holds the row lock"
    details: dict[str, Any] = {}
    if note:
        details["note"] = note
    if assignee:
        details["assignee"] = assignee
    if resolution:
        details["resolution"] = resolution
    transition = await conn.fetchrow(
        """
        INSERT INTO ticket_transitions (ticket_id, action, from_status, to_status,
                                        from_priority, to_priority, actor, version, details)
        VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8::jsonb)
        RETURNING id, at, action, from_status, to_status, from_priority, to_priority, actor,
                  version, details::text AS details
        """,
        ticket_id,
        action,
        from_status.value,
        to_status.value,
        ticket["priority"],
        actor,
        ticket["version"],
        orjson.dumps(details).decode(),
    )
    assert transition is not None
    return ticket, transition
