"""Request and response models of the HTTP API (separate create / update / public shapes)."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cityops.api.fields import Metadata, SafeText
from cityops.common.events import (
    ManholeReading,
    ParkingReading,
    StreetlightReading,
    WastebinReading,
)
from cityops.common.kinds import Kind, Priority, TicketStatus
from cityops.common.topics import DEVICE_ID_PATTERN, RESERVED_DEVICE_IDS, is_reserved_device_id

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN, min_length=3, max_length=64)]
District = Annotated[SafeText, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
Zone = Annotated[SafeText, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]
ReportingInterval = Annotated[int, Field(ge=1, le=604_800)]

_READING_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.STREETLIGHT: StreetlightReading,
    Kind.MANHOLE: ManholeReading,
    Kind.WASTEBIN: WastebinReading,
    Kind.PARKING: ParkingReading,
}


def _is_measure(annotation: Any) -> bool:
    """A numeric or boolean field (what can be aggregated in buckets)."""
    if annotation in (float, int, bool):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_measure(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_measure(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return False


# kind -> fields a readings query may ask for (numbers and booleans of that kind's reading).
MEASURE_FIELDS: dict[Kind, frozenset[str]] = {
    kind: frozenset(
        name
        for name, info in model.model_fields.items()
        if name != "seq" and _is_measure(info.annotation)
    )
    for kind, model in _READING_MODELS.items()
}


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DeviceCreate(_Input):
    """A device to provision."""

    device_id: DeviceId
    kind: Kind
    district: District = "unassigned"
    zone: Zone | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    reporting_interval_s: ReportingInterval | None = None
    metadata: Metadata = Field(default_factory=dict)
    enabled: bool = True

    @field_validator("device_id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        # the broker binds client ids to device ids: these belong to the MQTT services
        if is_reserved_device_id(value):
            names = ", ".join(RESERVED_DEVICE_IDS)
            raise ValueError(f"reserved for the platform's MQTT services ({names}, or NAME-...)")
        return value

    @model_validator(mode="after")
    def _both_coordinates(self) -> DeviceCreate:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon must be given together")
        return self


class DevicePatch(_Input):
    """Fields of a device that may change (id and kind never do)."""

    district: District | None = None
    zone: Zone | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    reporting_interval_s: ReportingInterval | None = None
    metadata: Metadata | None = None
    enabled: bool | None = None


class DeviceStateOut(BaseModel):
    """The latest reading of a device."""

    seq: int
    ts: datetime
    received_at: datetime
    values: dict[str, Any]


class ConnectivityOut(BaseModel):
    """Whether a device is online and when it was last heard."""

    online: bool
    last_seen_at: datetime
    changed_at: datetime


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


class DeviceOut(BaseModel):
    """A device: registry, latest state and connectivity."""

    device_id: str
    kind: Kind
    district: str
    zone: str | None
    lat: float | None
    lon: float | None
    reporting_interval_s: int
    metadata: dict[str, Any]
    enabled: bool
    created_at: datetime
    updated_at: datetime
    state: DeviceStateOut | None
    connectivity: ConnectivityOut | None


class DeviceDetail(DeviceOut):
    """A device with its open tickets."""

    open_tickets: list[TicketBrief]


class DevicePage(BaseModel):
    """One page of devices; pass `next_cursor` as `cursor` for the next page."""

    items: list[DeviceOut]
    next_cursor: str | None


class MqttCredentials(BaseModel):
    """A device's MQTT login, shown once."""

    username: str
    password: str
    telemetry_topic: str
    status_topic: str


class DeviceProvisioned(BaseModel):
    """A created device and its MQTT credentials (the password is not stored in clear)."""

    device: DeviceOut
    mqtt: MqttCredentials


class ImportRowError(BaseModel):
    """Why one imported row was refused."""

    row: int
    device_id: str | None
    errors: list[dict[str, str]]


class ImportedCredential(BaseModel):
    """MQTT credentials of a device created by an import."""

    device_id: str
    username: str
    password: str


class ImportResult(BaseModel):
    """The outcome of a bulk import: valid rows are kept, refused rows say why."""

    created: int
    updated: int
    failed: int
    errors: list[ImportRowError]
    credentials: list[ImportedCredential]


class ReadingPoint(BaseModel):
    """One reading from history."""

    seq: int
    ts: datetime
    received_at: datetime
    values: dict[str, Any]


class ReadingBucket(BaseModel):
    """Aggregates of one field over one time bucket (booleans count as 0/1)."""

    start: datetime
    count: int
    min: float | None
    max: float | None
    avg: float | None
    last: float | None


class ReadingsOut(BaseModel):
    """Readings of a device over a time range: raw points or buckets of one field."""

    device_id: str
    start: datetime
    end: datetime
    field: str | None
    bucket_s: int | None
    points: list[ReadingPoint] | None
    buckets: list[ReadingBucket] | None


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


class TransitionIn(_Input):
    """Move a ticket to a new status; `version` must be the ticket's current version."""

    to: TicketStatus
    version: int = Field(ge=1, le=2**31 - 1)
    assignee: Annotated[SafeText, Field(min_length=1, max_length=128)] | None = None
    resolution: Annotated[SafeText, Field(min_length=1, max_length=200)] | None = None
    note: Annotated[SafeText, Field(max_length=2000)] | None = None


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


class ApiKeyCreate(_Input):
    """A new API key."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    scopes: list[Literal["read", "operate", "admin"]] = Field(min_length=1, max_length=3)


class ApiKeyOut(BaseModel):
    """An API key's public facts (never the key)."""

    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="Last authenticated use, written by each replica at most every"
        " CITYOPS_API_KEY_USAGE_FLUSH_S (null: never used)."
    )


class ApiKeyCreated(ApiKeyOut):
    """A created key: `key` is shown once and stored only as a hash."""

    key: str


class ApiKeyList(BaseModel):
    """Every API key."""

    items: list[ApiKeyOut]
