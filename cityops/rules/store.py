"""All SQL of the rules service: automatic ticket transitions, rule state, the event outbox.

Every function takes an open connection and keyword-only arguments; the caller owns the
transaction. Writes are batched (one `unnest` statement per kind of change) and idempotent
where a replay could repeat them; `save_states` is also the write fence between replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from cityops.common.kinds import Kind, Priority, TicketStatus
from cityops.common.tickets import TicketEvent, escalated
from cityops.rules.engine import (
    SEEN_WINDOW,
    Clear,
    DeviceState,
    Escalate,
    OpenTicket,
    Pending,
    Raise,
    Step,
)

ACTOR = "rules"
_UNRESOLVED_SQL = "('open', 'acknowledged', 'in_progress')"
# The escalation step as data, so SQL and Python share one definition (common.tickets).
_ESCALATION_MAP = orjson.dumps({p.value: escalated(p).value for p in Priority}).decode()
_TICKET_COLUMNS = (
    "t.id, t.device_id, t.kind, t.district, t.rule, t.priority, t.department, t.status, "
    "t.opened_at, t.due_at, t.occurrences, t.version, t.escalations"
)


Conn = asyncpg.Connection | PoolConnectionProxy
"""A connection, or one borrowed from a pool."""


class StateConflictError(RuntimeError):
    """Another replica wrote a device's rule state since this one read it."""


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


_WINDOW_BYTES = SEEN_WINDOW // 8
_FULL_WINDOW = (1 << SEEN_WINDOW) - 1


def window_bytes(seen_below: int) -> bytes:
    """The seen-seq bitmap as stored in `rule_state.seen_below`."""
    return seen_below.to_bytes(_WINDOW_BYTES, "big")


def window_int(stored: bytes | None) -> int:
    """The stored bitmap as an int; a row from before the window counts every seq as seen."""
    return _FULL_WINDOW if stored is None else int.from_bytes(stored, "big") & _FULL_WINDOW


# Rule state --------------------------------------------------------------------------------


async def load_states(conn: Conn | asyncpg.Pool, *, partitions: Sequence[int]) -> list[DeviceState]:
    """The stored state of every device in `partitions`, with its unresolved tickets."""
    rows = await conn.fetch(
        """
        SELECT device_id, kind, kafka_partition, last_seq, seen_below, last_ts, last_seen_at,
               last_status_offset, pending::text AS pending
        FROM rule_state WHERE kafka_partition = ANY($1::int[])
        """,
        list(partitions),
    )
    states: dict[str, DeviceState] = {}
    for row in rows:
        pending = {
            rule: Pending(float(value["since"]), dict(value.get("details", {})))
            for rule, value in orjson.loads(row["pending"]).items()
        }
        seen = _epoch(row["last_seen_at"])
        states[row["device_id"]] = DeviceState(
            device_id=row["device_id"],
            kind=Kind(row["kind"]),
            partition=row["kafka_partition"],
            last_seq=row["last_seq"],
            seen_below=window_int(row["seen_below"]),
            last_ts=_epoch(row["last_ts"]),
            last_seen=seen,
            last_status_offset=row["last_status_offset"],
            pending=pending,
            persisted=True,
            persisted_seq=row["last_seq"],
            persisted_seen_below=row["seen_below"],
            persisted_status_offset=row["last_status_offset"],
            persisted_seen=seen,
        )
    tickets = await conn.fetch(
        f"""
        SELECT t.id, t.device_id, t.rule, t.priority, t.opened_at, t.due_at, t.escalations
        FROM tickets t JOIN rule_state s ON s.device_id = t.device_id
        WHERE s.kafka_partition = ANY($1::int[]) AND t.status IN {_UNRESOLVED_SQL}
        """,  # noqa: S608 - constant fragment
        list(partitions),
    )
    for row in tickets:
        state = states.get(row["device_id"])
        if state is not None:
            state.open[row["rule"]] = OpenTicket(
                ticket_id=row["id"],
                priority=Priority(row["priority"]),
                opened_at=row["opened_at"].timestamp(),
                due_at=row["due_at"].timestamp(),
                escalations=row["escalations"],
            )
    return list(states.values())


async def save_states(conn: Conn, *, states: Sequence[DeviceState]) -> None:
    """Upsert device states; StateConflictError when another replica wrote one meanwhile.

    The fence: a stored row is only overwritten when it still holds what this replica last
    read or wrote (`persisted_seq` / `persisted_status_offset`), and a new row is only inserted
    when none exists. Call it first in the transaction: it also locks the rows.
    """
    if not states:
        return
    ordered = sorted(states, key=lambda s: s.device_id)
    known = [s for s in ordered if s.persisted]
    new = [s for s in ordered if not s.persisted]
    written: set[str] = set()
    if known:
        # UPDATE re-checks its WHERE after waiting for a concurrent writer's row lock, so a
        # replica that lost the race sees the other's values and matches nothing.
        rows = await conn.fetch(
            """
            UPDATE rule_state AS s
            SET kind = u.kind, kafka_partition = u.kafka_partition, last_seq = u.last_seq,
                last_ts = u.last_ts, last_seen_at = u.last_seen_at,
                last_status_offset = u.last_status_offset, pending = u.pending::jsonb,
                seen_below = u.seen_below, updated_at = now()
            FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::timestamptz[],
                        $6::timestamptz[], $7::bigint[], $8::text[], $9::bytea[], $10::bigint[],
                        $11::bigint[], $12::bytea[])
                 AS u(device_id, kind, kafka_partition, last_seq, last_ts, last_seen_at,
                      last_status_offset, pending, seen_below, expected_seq,
                      expected_status_offset, expected_seen_below)
            WHERE s.device_id = u.device_id AND s.last_seq = u.expected_seq
              AND s.last_status_offset = u.expected_status_offset
              AND s.seen_below IS NOT DISTINCT FROM u.expected_seen_below
            RETURNING s.device_id
            """,
            *_state_columns(known),
            [s.persisted_seq for s in known],
            [s.persisted_status_offset for s in known],
            [s.persisted_seen_below for s in known],
        )
        written.update(row["device_id"] for row in rows)
    if new:
        rows = await conn.fetch(
            """
            INSERT INTO rule_state (device_id, kind, kafka_partition, last_seq, last_ts,
                                    last_seen_at, last_status_offset, pending, seen_below)
            SELECT u.device_id, u.kind, u.kafka_partition, u.last_seq, u.last_ts,
                   u.last_seen_at, u.last_status_offset, u.pending::jsonb, u.seen_below
            FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::timestamptz[],
                        $6::timestamptz[], $7::bigint[], $8::text[], $9::bytea[])
                 AS u(device_id, kind, kafka_partition, last_seq, last_ts, last_seen_at,
                      last_status_offset, pending, seen_below)
            ON CONFLICT (device_id) DO NOTHING
            RETURNING device_id
            """,
            *_state_columns(new),
        )
        written.update(row["device_id"] for row in rows)
    if len(written) != len(ordered):
        lost = [s.device_id for s in ordered if s.device_id not in written]
        raise StateConflictError(
            f"rule state of {len(lost)} device(s) changed under this replica, e.g. {lost[:3]}"
        )


def _state_columns(states: Sequence[DeviceState]) -> list[list[Any]]:
    return [
        [s.device_id for s in states],
        [s.kind.value for s in states],
        [s.partition for s in states],
        [s.last_seq for s in states],
        [_ts(s.last_ts) if s.last_ts else None for s in states],
        [_ts(s.last_seen) if s.last_seen else None for s in states],
        [s.last_status_offset for s in states],
        [_pending_json(s.pending) for s in states],
        [window_bytes(s.seen_below) for s in states],
    ]


def mark_saved(states: Iterable[DeviceState]) -> None:
    """After the transaction committed: the database now holds these states."""
    for state in states:
        state.persisted = True
        state.persisted_seq = state.last_seq
        state.persisted_seen_below = window_bytes(state.seen_below)
        state.persisted_status_offset = state.last_status_offset
        state.persisted_seen = state.last_seen


def _pending_json(pending: Mapping[str, Pending]) -> str:
    return orjson.dumps(
        {rule: {"since": p.since, "details": p.details} for rule, p in pending.items()}
    ).decode()


# Tickets -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One automatic transition to record: the ticket row after it, and what happened."""

    ticket: asyncpg.Record
    action: str
    at: float
    from_status: TicketStatus | None
    from_priority: Priority | None
    details: dict[str, Any]


async def apply_step(conn: Conn, *, step: Step) -> list[Change]:
    """Apply one step of decisions; return the transitions it made (occurrences are not ones).

    Returns also the bumped tickets (action "occurrence") so the caller learns their ids; those
    are not recorded as transitions.
    """
    changes: list[Change] = []
    if step.clears:
        changes += await _resolve(conn, clears=list(step.clears.values()))
    if step.raises:
        changes += await _open_or_bump(conn, raises=list(step.raises.values()))
    if step.escalations:
        changes += await _escalate(conn, escalations=list(step.escalations.values()))
    return changes


async def _open_or_bump(conn: Conn, *, raises: Sequence[tuple[Raise, int, float]]) -> list[Change]:
    ordered = sorted(raises, key=lambda r: (r[0].device_id, r[0].rule.id))
    rows = await conn.fetch(
        f"""
        INSERT INTO tickets AS t (device_id, kind, district, rule, priority, department, status,
                                  opened_at, due_at, occurrences, last_seen_at, details)
        SELECT u.device_id, u.kind, u.district, u.rule, u.priority, u.department, 'open',
               u.opened_at, u.due_at, u.occurrences, u.last_seen_at, u.details::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::timestamptz[], $9::int[], $10::timestamptz[],
                    $11::text[])
             AS u(device_id, kind, district, rule, priority, department, opened_at, due_at,
                  occurrences, last_seen_at, details)
        ON CONFLICT (device_id, rule) WHERE status IN {_UNRESOLVED_SQL}
        DO UPDATE SET occurrences = t.occurrences + excluded.occurrences,
                      last_seen_at = greatest(t.last_seen_at, excluded.last_seen_at)
        RETURNING {_TICKET_COLUMNS}, (t.xmax = 0) AS inserted
        """,  # noqa: S608 - constant fragments
        [r.device_id for r, _, _ in ordered],
        [r.kind.value for r, _, _ in ordered],
        [r.district for r, _, _ in ordered],
        [r.rule.id for r, _, _ in ordered],
        [r.rule.spec.priority.value for r, _, _ in ordered],
        [r.rule.spec.department for r, _, _ in ordered],
        [_ts(r.at) for r, _, _ in ordered],
        [_ts(r.at + r.rule.spec.sla_s) for r, _, _ in ordered],
        [count for _, count, _ in ordered],
        [_ts(last) for _, _, last in ordered],
        [orjson.dumps(r.details).decode() for r, _, _ in ordered],
    )
    details = {(r.device_id, r.rule.id): r for r, _, _ in ordered}
    return [
        Change(
            ticket=row,
            action="opened" if row["inserted"] else "occurrence",
            at=row["opened_at"].timestamp(),
            from_status=None,
            from_priority=None,
            details={"reading": details[(row["device_id"], row["rule"])].details},
        )
        for row in rows
    ]


async def _resolve(conn: Conn, *, clears: Sequence[Clear]) -> list[Change]:
    ordered = sorted(clears, key=lambda c: (c.device_id, c.rule_id))
    rows = await conn.fetch(
        f"""
        WITH target AS (
            SELECT t.id, t.status AS from_status, u.at
            FROM tickets t
            JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(device_id, rule, at)
              ON t.device_id = u.device_id AND t.rule = u.rule
            WHERE t.status IN {_UNRESOLVED_SQL}
            ORDER BY t.id
            FOR UPDATE OF t
        )
        UPDATE tickets t
        SET status = 'resolved', resolved_at = greatest(target.at, t.opened_at),
            resolution = 'auto', version = t.version + 1
        FROM target WHERE t.id = target.id
        RETURNING {_TICKET_COLUMNS}, target.from_status, t.resolved_at
        """,  # noqa: S608 - constant fragments
        [c.device_id for c in ordered],
        [c.rule_id for c in ordered],
        [_ts(c.at) for c in ordered],
    )
    by_key = {(c.device_id, c.rule_id): c for c in ordered}
    return [
        Change(
            ticket=row,
            action="auto_resolved",
            at=row["resolved_at"].timestamp(),
            from_status=TicketStatus(row["from_status"]),
            from_priority=None,
            details={"reading": by_key[(row["device_id"], row["rule"])].details},
        )
        for row in rows
    ]


async def _escalate(conn: Conn, *, escalations: Sequence[Escalate]) -> list[Change]:
    ordered = sorted(escalations, key=lambda e: e.ticket_id)
    rows = await conn.fetch(
        f"""
        WITH target AS (
            SELECT t.id, t.priority AS from_priority, u.at
            FROM tickets t
            JOIN unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS u(id, escalations, at)
              ON t.id = u.id AND t.escalations = u.escalations
            WHERE t.status IN {_UNRESOLVED_SQL}
            ORDER BY t.id
            FOR UPDATE OF t
        )
        UPDATE tickets t
        SET priority = ($4::jsonb ->> t.priority), escalations = t.escalations + 1,
            escalated_at = target.at, version = t.version + 1
        FROM target WHERE t.id = target.id
        RETURNING {_TICKET_COLUMNS}, target.from_priority, t.escalated_at
        """,  # noqa: S608 - constant fragments
        [e.ticket_id for e in ordered],
        [e.escalations for e in ordered],
        [_ts(e.at) for e in ordered],
        _ESCALATION_MAP,
    )
    return [
        Change(
            ticket=row,
            action="escalated",
            at=row["escalated_at"].timestamp(),
            from_status=TicketStatus(row["status"]),
            from_priority=Priority(row["from_priority"]),
            details={"escalations": row["escalations"], "due_at": row["due_at"].isoformat()},
        )
        for row in rows
    ]


async def record_transitions(conn: Conn, *, changes: Sequence[Change]) -> list[TicketEvent]:
    """Append the audit rows and outbox events of `changes` (one per ticket); return the events."""
    changes = [c for c in changes if c.action != "occurrence"]
    if not changes:
        return []
    rows = await conn.fetch(
        """
        INSERT INTO ticket_transitions (ticket_id, at, action, from_status, to_status,
                                        from_priority, to_priority, actor, version, details)
        SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::int[], $10::jsonb[])
        RETURNING id, ticket_id, at
        """,
        [c.ticket["id"] for c in changes],
        [_ts(c.at) for c in changes],
        [c.action for c in changes],
        [c.from_status.value if c.from_status else None for c in changes],
        [c.ticket["status"] for c in changes],
        [c.from_priority.value if c.from_priority else c.ticket["priority"] for c in changes],
        [c.ticket["priority"] for c in changes],
        [ACTOR] * len(changes),
        [c.ticket["version"] for c in changes],
        [orjson.dumps(c.details).decode() for c in changes],
    )
    transition = {row["ticket_id"]: row for row in rows}  # one change per ticket per step
    events = []
    for change in changes:
        ticket = change.ticket
        row = transition[ticket["id"]]
        events.append(
            TicketEvent(
                transition_id=row["id"],
                ticket_id=ticket["id"],
                action=change.action,
                at=row["at"],
                actor=ACTOR,
                device_id=ticket["device_id"],
                kind=ticket["kind"],
                district=ticket["district"],
                rule=ticket["rule"],
                priority=Priority(ticket["priority"]),
                department=ticket["department"],
                status=TicketStatus(ticket["status"]),
                from_status=change.from_status,
                opened_at=ticket["opened_at"],
                due_at=ticket["due_at"],
                occurrences=ticket["occurrences"],
                version=ticket["version"],
                details=change.details,
            )
        )
    await conn.execute(
        """
        INSERT INTO rule_outbox (transition_id, device_id, payload)
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::jsonb[])
        """,
        [e.transition_id for e in events],
        [e.device_id for e in events],
        [e.model_dump_json() for e in events],
    )
    return events


# Outbox ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A ticket event waiting for Kafka's acknowledgement."""

    transition_id: int
    device_id: str
    payload: bytes


async def load_outbox(
    conn: Conn | asyncpg.Pool, *, older_than_s: float, limit: int
) -> list[OutboxEvent]:
    """Events left behind (by a crash) for longer than `older_than_s`, oldest first."""
    rows = await conn.fetch(
        """
        SELECT transition_id, device_id, payload::text AS payload FROM rule_outbox
        WHERE created_at < now() - make_interval(secs => $1)
        ORDER BY transition_id LIMIT $2
        """,
        older_than_s,
        limit,
    )
    return [
        OutboxEvent(row["transition_id"], row["device_id"], row["payload"].encode()) for row in rows
    ]


async def delete_outbox(conn: Conn | asyncpg.Pool, *, transition_ids: Sequence[int]) -> None:
    """Forget events Kafka acknowledged."""
    if transition_ids:
        await conn.execute(
            "DELETE FROM rule_outbox WHERE transition_id = ANY($1::bigint[])", list(transition_ids)
        )


# Reads for metrics and profiles ------------------------------------------------------------


async def open_ticket_counts(
    conn: Conn | asyncpg.Pool,
) -> dict[tuple[str, str], int]:
    """Unresolved tickets by (district, priority), across all replicas."""
    rows = await conn.fetch(
        f"""
        SELECT district, priority, count(*) AS n FROM tickets
        WHERE status IN {_UNRESOLVED_SQL} GROUP BY district, priority
        """  # noqa: S608 - constant fragment
    )
    return {(row["district"], row["priority"]): row["n"] for row in rows}


async def load_district_metadata(
    conn: Conn | asyncpg.Pool,
) -> dict[str, dict[str, Any]]:
    """Every district's metadata (rule overrides, zone limits)."""
    rows = await conn.fetch("SELECT district, metadata::text AS metadata FROM districts")
    return {row["district"]: orjson.loads(row["metadata"]) for row in rows}
