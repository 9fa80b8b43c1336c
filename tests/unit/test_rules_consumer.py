"""Record decoding at the edge of the rules worker, and `cityops rules --check`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from cityops.common.events import StatusEvent, encode_status, encode_telemetry, parse_reading
from cityops.common.kinds import Kind
from cityops.rules.consumer import BadRecordError, decode_observation, decode_status_observation
from cityops.rules.main import main

RECEIVED = datetime(2026, 11, 26, 8, 15, 1, tzinfo=UTC)


def test_telemetry_record_becomes_an_observation() -> None:
    reading = parse_reading(
        b'{"device_id":"wb-0042","kind":"wastebin","ts":"2026-11-26T08:15:00Z","seq":311,'
        b'"fill_pct":87.5,"temperature_c":14.2,"battery_pct":71}'
    )
    obs = decode_observation(encode_telemetry(reading, received_at=RECEIVED, ingest_id="i-1"))
    assert (obs.device_id, obs.kind, obs.seq) == ("wb-0042", Kind.WASTEBIN, 311)
    assert obs.received_at == RECEIVED.timestamp()
    assert obs.ts == RECEIVED.timestamp() - 1
    assert obs.fields == {"fill_pct": 87.5, "temperature_c": 14.2, "battery_pct": 71}


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"not json",
        b"[]",
        b'{"device_id":"wb-1","kind":"wastebin","seq":1,"ts":"2026-11-26T08:15:00Z"}',
        b'{"device_id":"wb-1","kind":"bench","seq":1,"ts":"2026-11-26T08:15:00Z",'
        b'"received_at":"2026-11-26T08:15:00Z"}',
        b'{"device_id":"wb-1","kind":"wastebin","seq":"1","ts":"2026-11-26T08:15:00Z",'
        b'"received_at":"2026-11-26T08:15:00Z"}',
        b'{"device_id":"wb-1","kind":"wastebin","seq":1,"ts":"yesterday",'
        b'"received_at":"2026-11-26T08:15:00Z"}',
        # issue 12 row 1: a ticket could not render it, PostgreSQL could not store it
        b'{"device_id":"wb-1","kind":"wastebin","seq":1,"ts":"0001-01-01T00:00:00+14:00",'
        b'"received_at":"2026-11-26T08:15:00Z"}',
        b'{"device_id":"wb-1","kind":"wastebin","seq":1,"ts":"9999-12-31T23:59:59-14:00",'
        b'"received_at":"2026-11-26T08:15:00Z"}',
        b'{"device_id":"wb-1","kind":"wastebin","seq":9223372036854775808,'
        b'"ts":"2026-11-26T08:15:00Z","received_at":"2026-11-26T08:15:00Z"}',
    ],
)
def test_bad_telemetry_records_are_refused(value: bytes | None) -> None:
    with pytest.raises(BadRecordError):
        decode_observation(value)


def test_status_record_becomes_a_status_observation() -> None:
    event = StatusEvent(
        device_id="mh-7", kind=Kind.MANHOLE, online=False, received_at=RECEIVED, ingest_id="i"
    )
    status = decode_status_observation(encode_status(event), 42)
    assert (status.device_id, status.online, status.offset) == ("mh-7", False, 42)
    with pytest.raises(BadRecordError):
        decode_status_observation(orjson.dumps({"online": "no"}), 1)


def test_check_accepts_the_defaults_and_refuses_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--check"]) == 0
    assert "11 rules OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: Bad Id\n", encoding="utf-8")
    assert main(["--check", str(bad)]) == 2
    assert "rules[0]" in capsys.readouterr().err
