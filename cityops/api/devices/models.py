"""Request and response models of devices and their readings."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_validator,
)

from cityops.api.http.fields import (
    DeviceId,
    District,
    Input,
    Latitude,
    Longitude,
    Metadata,
    ReportingInterval,
    Zone,
)
from cityops.api.tickets.models import TicketBrief
from cityops.common.events import (
    ManholeReading,
    ParkingReading,
    StreetlightReading,
    WastebinReading,
)
from cityops.common.kinds import Kind
from cityops.common.topics import RESERVED_DEVICE_IDS, is_reserved_device_id

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


class DeviceCreate(Input):
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


class DevicePatch(Input):
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
