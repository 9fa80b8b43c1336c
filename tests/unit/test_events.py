"""The event contract (A3): every field rule accepts what it should and refuses the rest."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from cityops.common.events import (
    StatusEvent,
    decode_status,
    decode_telemetry,
    encode_status,
    encode_telemetry,
    parse_reading,
)
from cityops.common.kinds import Kind

BASE: dict[str, Any] = {"ts": "2026-11-26T08:15:00Z", "seq": 311}
VALID: dict[str, dict[str, Any]] = {
    "streetlight": {"device_id": "sl-0001", "kind": "streetlight", "lamp_on": True},
    "manhole": {"device_id": "mh-0001", "kind": "manhole", "cover_open": False},
    "wastebin": {"device_id": "wb-0042", "kind": "wastebin", "fill_pct": 87.5},
    "parking": {"device_id": "pk-0001", "kind": "parking", "occupied": True},
}


def reading(kind: str, **fields: Any) -> bytes:
    body = {**BASE, **VALID[kind], **fields}
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()


def test_example_from_the_contract_parses() -> None:
    payload = (
        b'{"device_id":"wb-0042","kind":"wastebin","ts":"2026-11-26T08:15:00Z","seq":311,'
        b'"fill_pct":87.5,"temperature_c":14.2,"battery_pct":71}'
    )
    parsed = parse_reading(payload)
    assert parsed.kind == "wastebin"
    assert parsed.device_id == "wb-0042"
    assert parsed.seq == 311
    assert parsed.ts == datetime(2026, 11, 26, 8, 15, tzinfo=UTC)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_minimal_reading_of_every_kind_parses(kind: str) -> None:
    assert parse_reading(reading(kind)).kind == kind


VALID_FIELDS = [
    ("streetlight", {"dim_pct": 0, "power_w": 0.0, "voltage_v": 231.2, "fault": "none"}),
    ("streetlight", {"dim_pct": 100, "fault": "lamp_failure"}),
    ("streetlight", {"fault": "driver_fault"}),
    ("streetlight", {"fault": "power_loss", "lamp_on": False}),
    ("manhole", {"tilt_deg": 180, "water_level_pct": 100, "gas_ppm": 0}),
    ("wastebin", {"temperature_c": -60, "lid_open": True, "tilt_deg": 0, "fill_pct": 0}),
    ("wastebin", {"temperature_c": 200, "fill_pct": 100}),
    ("parking", {"occupied": False, "battery_pct": 0, "rssi_dbm": -150}),
    ("parking", {"battery_pct": 100, "rssi_dbm": 0}),
    ("parking", {"ts": "2026-11-26T16:15:00+08:00"}),
    ("parking", {"ts": "2026-11-26T08:15:00.123456-03:30"}),
    ("parking", {"seq": 0}),
    ("parking", {"device_id": "abc"}),
    ("parking", {"device_id": "A" * 64}),
    ("parking", {"device_id": "a_b.c-D9"}),
]


@pytest.mark.parametrize(("kind", "fields"), VALID_FIELDS)
def test_valid_field_values_are_accepted(kind: str, fields: dict[str, Any]) -> None:
    parse_reading(reading(kind, **fields))


INVALID_FIELDS = [
    # common fields
    ("parking", {"ts": "2026-11-26T08:15:00"}, "ts"),  # no offset
    ("parking", {"ts": "yesterday"}, "ts"),
    ("parking", {"ts": 1764144900}, "ts"),  # epoch numbers are not RFC 3339
    ("parking", {"ts": _DROP}, "ts"),
    ("parking", {"seq": -1}, "seq"),
    ("parking", {"seq": "5"}, "seq"),
    ("parking", {"seq": 1.5}, "seq"),
    ("parking", {"seq": _DROP}, "seq"),
    ("parking", {"device_id": "ab"}, "device_id"),
    ("parking", {"device_id": "A" * 65}, "device_id"),
    ("parking", {"device_id": "bad/id"}, "device_id"),
    ("parking", {"device_id": "bad id"}, "device_id"),
    ("parking", {"device_id": _DROP}, "device_id"),
    ("parking", {"battery_pct": 100.1}, "battery_pct"),
    ("parking", {"battery_pct": -1}, "battery_pct"),
    ("parking", {"battery_pct": "50"}, "battery_pct"),
    ("parking", {"rssi_dbm": 1}, "rssi_dbm"),
    ("parking", {"rssi_dbm": -151}, "rssi_dbm"),
    ("parking", {"colour": "red"}, "colour"),  # unknown extra field
    # streetlight
    ("streetlight", {"lamp_on": _DROP}, "lamp_on"),
    ("streetlight", {"lamp_on": 1}, "lamp_on"),
    ("streetlight", {"lamp_on": "true"}, "lamp_on"),
    ("streetlight", {"dim_pct": 101}, "dim_pct"),
    ("streetlight", {"power_w": -0.1}, "power_w"),
    ("streetlight", {"voltage_v": -1}, "voltage_v"),
    ("streetlight", {"fault": "broken"}, "fault"),
    ("streetlight", {"fill_pct": 10}, "fill_pct"),  # another kind's field
    # manhole
    ("manhole", {"cover_open": _DROP}, "cover_open"),
    ("manhole", {"tilt_deg": 181}, "tilt_deg"),
    ("manhole", {"tilt_deg": -1}, "tilt_deg"),
    ("manhole", {"water_level_pct": 120}, "water_level_pct"),
    ("manhole", {"gas_ppm": -5}, "gas_ppm"),
    # wastebin
    ("wastebin", {"fill_pct": _DROP}, "fill_pct"),
    ("wastebin", {"fill_pct": 100.5}, "fill_pct"),
    ("wastebin", {"fill_pct": -0.5}, "fill_pct"),
    ("wastebin", {"temperature_c": 201}, "temperature_c"),
    ("wastebin", {"temperature_c": -61}, "temperature_c"),
    ("wastebin", {"lid_open": "yes"}, "lid_open"),
    ("wastebin", {"tilt_deg": 190}, "tilt_deg"),
    # parking
    ("parking", {"occupied": _DROP}, "occupied"),
    ("parking", {"occupied": None}, "occupied"),
]


@pytest.mark.parametrize(("kind", "fields", "field"), INVALID_FIELDS)
def test_invalid_field_values_are_refused_naming_the_field(
    kind: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_reading(reading(kind, **fields))
    locations = {".".join(str(p) for p in err["loc"]) for err in caught.value.errors()}
    assert any(loc.endswith(field) for loc in locations), locations


@pytest.mark.parametrize(
    "payload",
    [
        b'{"device_id":"x-001","kind":"toaster","ts":"2026-11-26T08:15:00Z","seq":1}',
        b'{"device_id":"x-001","ts":"2026-11-26T08:15:00Z","seq":1,"occupied":true}',
        b'{"device_id":"pk-001","kind":"parking","ts":"2026-11-26T08:15:00Z","seq":1,'
        b'"occupied":true,"battery_pct":NaN}',
        b"[]",
        b"not json",
    ],
)
def test_unknown_kind_missing_kind_nan_and_non_objects_are_refused(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_reading(payload)


def test_telemetry_record_round_trips_with_ingest_metadata() -> None:
    original = parse_reading(reading("wastebin", temperature_c=14.2))
    received = datetime(2026, 11, 26, 8, 15, 1, tzinfo=UTC)
    value = encode_telemetry(original, received_at=received, ingest_id="ingest-a")
    body = orjson.loads(value)
    assert body["received_at"] == "2026-11-26T08:15:01+00:00"
    assert "lid_open" not in body  # absent optional fields stay absent
    record = decode_telemetry(value)
    assert record.reading == original
    assert record.received_at == received
    assert record.ingest_id == "ingest-a"


def test_status_event_round_trips() -> None:
    event = StatusEvent(
        device_id="sl-0001",
        kind=Kind.STREETLIGHT,
        online=False,
        received_at=datetime(2026, 11, 26, tzinfo=UTC),
        ingest_id="ingest-a",
    )
    assert decode_status(encode_status(event)) == event


@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z", "9999-12-31T23:59:59-14:00"]
)
def test_a_record_produced_straight_into_kafka_with_a_ts_no_store_takes_is_refused(
    ts: str,
) -> None:
    """Consumers decode with the same bounds ingest validates with (issue 12, row 1)."""
    value = orjson.dumps(
        {
            **VALID["wastebin"],
            "ts": ts,
            "seq": 1,
            "received_at": "2026-11-26T08:15:01+00:00",
            "ingest_id": "forged",
        }
    )
    with pytest.raises(ValidationError, match="ts"):
        decode_telemetry(value)
    status = orjson.dumps(
        {
            "device_id": "wb-0042",
            "kind": "wastebin",
            "online": True,
            "ts": ts,
            "received_at": "2026-11-26T08:15:01+00:00",
            "ingest_id": "forged",
        }
    )
    with pytest.raises(ValidationError, match="ts"):
        decode_status(status)
