"""Response models of districts."""

from __future__ import annotations

from datetime import datetime

from pydantic import (
    BaseModel,
)


class DistrictOut(BaseModel):
    """A district and how many devices of each kind it has."""

    district: str
    name: str | None
    devices: int
    by_kind: dict[str, int]


class DistrictList(BaseModel):
    """Every district with devices or settings."""

    items: list[DistrictOut]


class DistrictSummary(BaseModel):
    """The KPIs of one district (A8)."""

    district: str
    devices: int
    devices_online: int
    lights_reporting: int
    lights_working: int
    lights_working_pct: float | None
    bins_reporting: int
    bins_full: int
    bins_full_pct: float | None
    parking_reporting: int
    parking_occupied: int
    parking_occupancy_pct: float | None
    open_tickets_by_priority: dict[str, int]
    overdue_tickets: int
    sla_window_days: int
    resolved_in_window: int
    resolved_within_sla: int
    sla_compliance_pct: float | None
    computed_at: datetime
