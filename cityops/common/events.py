"""The event contract (A3, A4): readings, status messages, and their Kafka records.

Edges parse bytes into these models; everything downstream works on the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from cityops.common.kinds import Kind
from cityops.common.topics import DEVICE_ID_PATTERN

MAX_PAYLOAD_BYTES = 4096

# Every value must fit every store downstream (issue 12, row 1: a year-1 `ts` stopped the
# projector). Times: before 2000 is an unset sensor clock, and a fixed far bound keeps a record
# produced straight into Kafka representable in UTC; ingest also refuses ts > now + skew.
EARLIEST_TS = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TS = datetime(2100, 1, 1, tzinfo=UTC)
# Numbers: finite (allow_inf_nan=False), and open-ended quantities capped far above anything
# physical, so a sum over years of readings stays a finite float64 in PostgreSQL's aggregates.
MAX_QUANTITY = 1_000_000.0

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN, min_length=3, max_length=64)]
SensorTime = Annotated[AwareDatetime, Field(ge=EARLIEST_TS, lt=LATEST_TS)]
Percent = Annotated[float, Field(ge=0, le=100)]
NonNegative = Annotated[float, Field(ge=0, le=MAX_QUANTITY)]
TiltDeg = Annotated[float, Field(ge=0, le=180)]

# strict: no "5" -> 5 or 1 -> True coercions; a sensor that sends the wrong JSON type is wrong.
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ReadingBase(BaseModel):
    """Fields every reading carries; each kind's model narrows `kind` to its name."""

    model_config = _STRICT

    device_id: DeviceId
    ts: SensorTime = Field(
        description="When the sensor measured: RFC 3339 with an offset, 2000-01-01 to 2100-01-01."
    )
    seq: int = Field(ge=0, le=2**63 - 1, description="Per-device counter, +1 per reading.")
    battery_pct: Percent | None = None
    rssi_dbm: Annotated[float, Field(ge=-150, le=0)] | None = None
    # Declared here, after the common fields, so a kind's override keeps today's field order.
    kind: str


class StreetlightReading(ReadingBase):
    """A street light's reading."""

    kind: Literal["streetlight"]
    lamp_on: bool
    dim_pct: Percent | None = None
    power_w: NonNegative | None = None
    voltage_v: NonNegative | None = None
    fault: Literal["none", "lamp_failure", "driver_fault", "power_loss"] | None = None


class ManholeReading(ReadingBase):
    """A manhole cover's reading."""

    kind: Literal["manhole"]
    cover_open: bool
    tilt_deg: TiltDeg | None = None
    water_level_pct: Percent | None = None
    gas_ppm: NonNegative | None = None


class WastebinReading(ReadingBase):
    """A waste bin's reading."""

    kind: Literal["wastebin"]
    fill_pct: Percent
    temperature_c: Annotated[float, Field(ge=-60, le=200)] | None = None
    lid_open: bool | None = None
    tilt_deg: TiltDeg | None = None


class ParkingReading(ReadingBase):
    """A parking spot's reading."""

    kind: Literal["parking"]
    occupied: bool


Reading = Annotated[
    StreetlightReading | ManholeReading | WastebinReading | ParkingReading,
    Field(discriminator="kind"),
]
READING_ADAPTER: TypeAdapter[Reading] = TypeAdapter(Reading)


class StatusPayload(BaseModel):
    """What a device publishes on its status topic (also its MQTT last will)."""

    model_config = _STRICT

    online: bool
    ts: SensorTime | None = None


STATUS_ADAPTER: TypeAdapter[StatusPayload] = TypeAdapter(StatusPayload)


class StatusEvent(BaseModel):
    """A status message on `city.status.v1`: the payload plus who sent it and when it arrived."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId
    kind: Kind
    online: bool
    ts: SensorTime | None = None
    received_at: AwareDatetime
    ingest_id: str


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """A validated reading as carried on `city.telemetry.v1`."""

    reading: StreetlightReading | ManholeReading | WastebinReading | ParkingReading
    received_at: datetime
    ingest_id: str


def parse_reading(payload: bytes | str) -> Reading:
    """Validate one reading from JSON; raises pydantic.ValidationError."""
    return READING_ADAPTER.validate_json(payload)


def encode_telemetry(reading: Reading, *, received_at: datetime, ingest_id: str) -> bytes:
    """Normalised JSON for `city.telemetry.v1`: the reading plus received_at and ingest_id."""
    body: dict[str, Any] = reading.model_dump(mode="json", exclude_none=True)
    body["received_at"] = received_at.isoformat()
    body["ingest_id"] = ingest_id
    return orjson.dumps(body)


def decode_telemetry(value: bytes) -> TelemetryRecord:
    """Parse a `city.telemetry.v1` record value back into a reading and its ingest metadata."""
    body = orjson.loads(value)
    received_at = datetime.fromisoformat(body.pop("received_at"))
    ingest_id = str(body.pop("ingest_id"))
    reading = READING_ADAPTER.validate_python(body, strict=False)
    return TelemetryRecord(reading=reading, received_at=received_at, ingest_id=ingest_id)


def encode_status(event: StatusEvent) -> bytes:
    """Normalised JSON for `city.status.v1`."""
    return event.model_dump_json(exclude_none=True).encode()


def decode_status(value: bytes) -> StatusEvent:
    """Parse a `city.status.v1` record value."""
    return StatusEvent.model_validate_json(value)
