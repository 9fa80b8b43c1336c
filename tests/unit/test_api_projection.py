"""The projector's pure fold: newest state per device, distinct readings, latest connectivity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from cityops.api.projector.fold import fold, reading_row, reading_values, telemetry_row
from cityops.common.events import StatusEvent, TelemetryRecord, WastebinReading, encode_telemetry

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def record(device_id: str, seq: int, fill_pct: float, *, received_s: int = 0) -> TelemetryRecord:
    reading = WastebinReading(
        device_id=device_id,
        kind="wastebin",
        ts=T0 + timedelta(seconds=seq),
        seq=seq,
        fill_pct=fill_pct,
        battery_pct=80.0,
    )
    return TelemetryRecord(reading, T0 + timedelta(seconds=received_s), "ingest-1")


def status(device_id: str, online: bool, *, received_s: int) -> StatusEvent:
    return StatusEvent(
        device_id=device_id,
        kind="wastebin",
        online=online,
        received_at=T0 + timedelta(seconds=received_s),
        ingest_id="ingest-1",
    )


def test_newest_seq_wins_whatever_the_arrival_order() -> None:
    batch = fold([record("wb-1", 5, 50), record("wb-1", 7, 70), record("wb-1", 6, 60)])
    assert batch.states["wb-1"].seq == 7
    assert orjson.loads(batch.states["wb-1"].values_json) == {"fill_pct": 70, "battery_pct": 80}


def test_replayed_readings_are_written_once() -> None:
    batch = fold([record("wb-1", 5, 50), record("wb-1", 5, 50), record("wb-2", 5, 10)])
    assert sorted((key[0], key[2]) for key in batch.readings) == [("wb-1", 5), ("wb-2", 5)]
    assert set(batch.states) == {"wb-1", "wb-2"}


def test_values_leave_out_the_identifying_columns() -> None:
    values = reading_values(record("wb-1", 5, 50))
    assert values == {"fill_pct": 50, "battery_pct": 80}


def test_connectivity_follows_the_latest_message_by_arrival() -> None:
    batch = fold(
        [
            record("wb-1", 1, 10, received_s=10),
            status("wb-1", False, received_s=20),
            status("wb-1", True, received_s=5),  # late: older than the offline
        ]
    )
    row = batch.connectivity["wb-1"]
    assert row.online is False
    assert row.status_at == T0 + timedelta(seconds=20)
    assert row.seen_at == T0 + timedelta(seconds=10)


def test_an_offline_will_alone_is_not_a_sighting() -> None:
    batch = fold([status("wb-9", False, received_s=3)])
    assert batch.connectivity["wb-9"].seen_at is None
    assert batch.states == {}
    assert not batch.empty


def test_empty_batch() -> None:
    assert fold([]).empty


def test_telemetry_row_decodes_what_ingest_encodes() -> None:
    original = record("wb-1", 9, 55.5, received_s=4)
    value = encode_telemetry(original.reading, received_at=original.received_at, ingest_id="i")
    row = telemetry_row(value)
    assert row == reading_row(original)
    assert fold([row]).states["wb-1"].seq == 9


@pytest.mark.parametrize(
    "change",
    [
        {"device_id": None},
        {"device_id": "x"},
        {"kind": "rocket"},
        {"seq": -1},
        {"seq": True},
        {"seq": "5"},
        {"ts": "2026-11-26T08:00:00"},
        {"ts": 5},
        {"received_at": "yesterday"},
        {"ts": "0001-01-01T00:00:00+14:00"},  # issue 12 row 1: not representable in UTC
        {"ts": "9999-12-31T23:59:59-14:00"},
        {"ts": "1999-12-31T23:59:59Z"},
        {"received_at": "2100-01-01T00:00:00Z"},
        {"seq": 2**63},
    ],
)
def test_telemetry_row_refuses_what_the_tables_cannot_hold(change: dict[str, Any]) -> None:
    body = orjson.loads(
        encode_telemetry(record("wb-1", 1, 1.0).reading, received_at=T0, ingest_id="i")
    )
    body.update(change)
    with pytest.raises((ValueError, TypeError)):
        telemetry_row(orjson.dumps(body))
    with pytest.raises((ValueError, TypeError)):
        telemetry_row(b"[1, 2]")
