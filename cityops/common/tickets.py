"""The ticket domain shared by rules (automatic transitions) and api (operators' transitions).

Pure rules of A7: which status may follow which, how escalation moves priority, and the
event published on `city.tickets.v1` for every transition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict

from cityops.common.kinds import Priority, TicketStatus

UNRESOLVED: frozenset[TicketStatus] = frozenset(
    {TicketStatus.OPEN, TicketStatus.ACKNOWLEDGED, TicketStatus.IN_PROGRESS}
)

# Forward-only lifecycle; a rule may jump any unresolved ticket to resolved (auto-resolve),
# and an operator may resolve directly or reopen a resolved ticket that was not fixed.
ALLOWED_TRANSITIONS: dict[TicketStatus, frozenset[TicketStatus]] = {
    TicketStatus.OPEN: frozenset(
        {TicketStatus.ACKNOWLEDGED, TicketStatus.IN_PROGRESS, TicketStatus.RESOLVED}
    ),
    TicketStatus.ACKNOWLEDGED: frozenset({TicketStatus.IN_PROGRESS, TicketStatus.RESOLVED}),
    TicketStatus.IN_PROGRESS: frozenset({TicketStatus.RESOLVED}),
    TicketStatus.RESOLVED: frozenset({TicketStatus.CLOSED, TicketStatus.OPEN}),
    TicketStatus.CLOSED: frozenset(),
}


class TransitionError(ValueError):
    """A transition the state machine does not allow."""


def check_transition(current: TicketStatus, target: TicketStatus) -> None:
    """Raise TransitionError unless `current -> target` is allowed."""
    if target not in ALLOWED_TRANSITIONS[current]:
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[current])) or "none (final state)"
        raise TransitionError(
            f"cannot move a ticket from {current} to {target}; allowed: {allowed}"
        )


def escalated(priority: Priority) -> Priority:
    """One step more urgent, never above P1."""
    order = [Priority.P4, Priority.P3, Priority.P2, Priority.P1]
    return order[min(order.index(priority) + 1, len(order) - 1)]


class TicketEvent(BaseModel):
    """One transition of one ticket, as published on `city.tickets.v1` (key = device_id).

    `transition_id` is the audit row's id: consumers de-duplicate on it (delivery is
    at-least-once).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    transition_id: int
    ticket_id: int
    action: str
    at: AwareDatetime
    actor: str
    device_id: str
    kind: str
    district: str
    rule: str
    priority: Priority
    department: str
    status: TicketStatus
    from_status: TicketStatus | None = None
    opened_at: AwareDatetime
    due_at: AwareDatetime
    occurrences: int
    version: int
    details: dict[str, Any] = {}


def event_from_rows(ticket: Any, transition: Any) -> TicketEvent:
    """Build the event from a `tickets` row and its `ticket_transitions` row (mappings)."""
    return TicketEvent(
        transition_id=transition["id"],
        ticket_id=ticket["id"],
        action=transition["action"],
        at=transition["at"],
        actor=transition["actor"],
        device_id=ticket["device_id"],
        kind=ticket["kind"],
        district=ticket["district"],
        rule=ticket["rule"],
        priority=Priority(ticket["priority"]),
        department=ticket["department"],
        status=TicketStatus(ticket["status"]),
        from_status=TicketStatus(transition["from_status"]) if transition["from_status"] else None,
        opened_at=ticket["opened_at"],
        due_at=ticket["due_at"],
        occurrences=ticket["occurrences"],
        version=ticket["version"],
    )


def is_overdue(*, status: TicketStatus, due_at: datetime, now: datetime) -> bool:
    """Past its due time and not resolved."""
    return status in UNRESOLVED and now > due_at
