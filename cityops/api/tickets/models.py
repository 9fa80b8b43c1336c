"""Request and response models of tickets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
)

from cityops.api.http.fields import (
    Input,
    SafeText,
)
from cityops.common.kinds import Priority, TicketStatus


class TicketBrief(BaseModel):
    """An open ticket, as listed on its device."""

    id: int
    rule: str
    priority: Priority
    status: TicketStatus
    department: str
    opened_at: datetime
    due_at: datetime
    version: int


class TicketOut(BaseModel):
    """A maintenance ticket (A7)."""

    id: int
    device_id: str
    kind: str
    district: str
    rule: str
    priority: Priority
    department: str
    status: TicketStatus
    opened_at: datetime
    due_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None
    assignee: str | None
    occurrences: int
    last_seen_at: datetime
    details: dict[str, Any]
    resolution: str | None
    escalations: int
    version: int
    overdue: bool


class TransitionOut(BaseModel):
    """One audit-log row of a ticket."""

    id: int
    at: datetime
    action: str
    from_status: TicketStatus | None
    to_status: TicketStatus
    from_priority: Priority | None
    to_priority: Priority
    actor: str
    version: int
    details: dict[str, Any]


class TicketDetail(TicketOut):
    """A ticket with its audit log."""

    transitions: list[TransitionOut]


class TicketPage(BaseModel):
    """One page of tickets, newest first."""

    items: list[TicketOut]
    next_cursor: str | None


class TransitionIn(Input):
    """Move a ticket to a new status; `version` must be the ticket's current version."""

    to: TicketStatus
    version: int = Field(ge=1, le=2**31 - 1)
    assignee: Annotated[SafeText, Field(min_length=1, max_length=128)] | None = None
    resolution: Annotated[SafeText, Field(min_length=1, max_length=200)] | None = None
    note: Annotated[SafeText, Field(max_length=2000)] | None = None
