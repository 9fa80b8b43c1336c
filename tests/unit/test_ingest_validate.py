"""The pure validation pipeline: every A5 reason, in order, and the records it produces."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from cityops.common.events import decode_status, decode_telemetry, encode_telemetry, parse_reading
from cityops.common.kinds import Kind, RejectReason
from cityops.ingest.deadletters import deadletter_record
from cityops.ingest.ratelimit import TokenBuckets
from cityops.ingest.validate import (
    MAX_DETAIL_CHARS,
    Accepted,
    OutputTopics,
    Rejected,
    Validator,
)
from tests.ingest_poison import CORPUS, GOOD_TS, Poison

NOW = datetime(2026, 11, 26, 8, 15, 30, tzinfo=UTC)
REGISTRY = {
    "sl-0001": Kind.STREETLIGHT,
    "mh-0001": Kind.MANHOLE,
    "wb-0042": Kind.WASTEBIN,
    "pk-0001": Kind.PARKING,
}
FIELDS: dict[str, dict[str, Any]] = {
    "streetlight": {"device_id": "sl-0001", "lamp_on": True, "fault": "none"},
    "manhole": {"device_id": "mh-0001", "cover_open": False, "gas_ppm": 3},
    "wastebin": {"device_id": "wb-0042", "fill_pct": 87.5, "temperature_c": 14.2},
    "parking": {"device_id": "pk-0001", "occupied": True},
}


class DictRegistry:
    def __init__(self, kinds: dict[str, Kind]) -> None:
        self.kinds = kinds

    def kind_of(self, device_id: str) -> Kind | None:
        return self.kinds.get(device_id)


def make_validator(*, burst: float = 100, max_payload_bytes: int = 4096) -> Validator:
    return Validator(
        registry=DictRegistry(dict(REGISTRY)),
        telemetry_limiter=TokenBuckets(rate_per_s=1.0, burst=burst),
        status_limiter=TokenBuckets(rate_per_s=1.0, burst=burst),
        ingest_id="ingest-test-1",
        topics=OutputTopics(telemetry="t.tel", status="t.st", deadletter="t.dl"),
        max_payload_bytes=max_payload_bytes,
        clock_skew_s=300,
    )


def reading(kind: str, **overrides: Any) -> bytes:
    body = {"kind": kind, "ts": "2026-11-26T08:15:00Z", "seq": 7, **FIELDS[kind], **overrides}
    return orjson.dumps(body)


def topic(kind: str, device_id: str | None = None, channel: str = "telemetry") -> str:
    return f"city/{kind}/{device_id or FIELDS[kind]['device_id']}/{channel}"


def rejected(result: Accepted | Rejected) -> Rejected:
    assert isinstance(result, Rejected), result
    return result


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_a_valid_reading_of_every_kind_becomes_a_telemetry_record(kind: str) -> None:
    result = make_validator().validate(topic(kind), reading(kind), NOW)
    assert isinstance(result, Accepted), result
    assert result.topic == "t.tel"
    assert result.key == FIELDS[kind]["device_id"].encode()
    assert result.kind is Kind(kind)
    record = decode_telemetry(result.value)
    assert record.reading.device_id == FIELDS[kind]["device_id"]
    assert record.reading.seq == 7
    assert record.received_at == NOW
    assert record.ingest_id == "ingest-test-1"
    assert result.measured_at == datetime(2026, 11, 26, 8, 15, tzinfo=UTC)


def test_values_are_normalised() -> None:
    payload = reading("wastebin", ts="2026-11-26T09:15:00+01:00", fill_pct=50)
    result = make_validator().validate(topic("wastebin"), payload, NOW)
    assert isinstance(result, Accepted)
    body = orjson.loads(result.value)
    assert datetime.fromisoformat(body["ts"]) == datetime(2026, 11, 26, 8, 15, tzinfo=UTC)
    assert body["fill_pct"] == 50
    assert "lid_open" not in body  # absent optional fields stay absent


def test_too_large_is_refused_before_anything_is_parsed() -> None:
    payload = b"\xff" * 5000  # not even UTF-8: it must never be looked at
    result = rejected(make_validator().validate(topic("wastebin"), payload, NOW))
    assert result.reason is RejectReason.TOO_LARGE
    assert "5000" in result.detail
    assert result.key == b"wb-0042"


def test_the_size_cap_is_configurable() -> None:
    payload = reading("parking")
    assert isinstance(
        make_validator(max_payload_bytes=len(payload)).validate(topic("parking"), payload, NOW),
        Accepted,
    )
    result = make_validator(max_payload_bytes=len(payload) - 1).validate(
        topic("parking"), payload, NOW
    )
    assert rejected(result).reason is RejectReason.TOO_LARGE


@pytest.mark.parametrize(
    ("mqtt_topic", "key"),
    [
        ("city/lamp/sl-0001/telemetry", b"sl-0001"),
        ("city/streetlight/x/telemetry", None),
        ("city/streetlight/sl-0001/config", b"sl-0001"),
        ("city/streetlight/sl-0001/telemetry/extra", b"sl-0001"),
        ("town/streetlight/sl-0001/telemetry", None),
    ],
)
def test_malformed_topics(mqtt_topic: str, key: bytes | None) -> None:
    result = rejected(make_validator().validate(mqtt_topic, reading("streetlight"), NOW))
    assert result.reason is RejectReason.TOPIC
    assert result.key == key
    assert result.detail


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b'{"device_id": "wb-0042",', b"\xff\xfe{}", b"{'single': 'quotes'}"],
)
def test_not_json(payload: bytes) -> None:
    result = rejected(make_validator().validate(topic("wastebin"), payload, NOW))
    assert result.reason is RejectReason.NOT_JSON


@pytest.mark.parametrize(
    ("payload", "mentions"),
    [
        (reading("wastebin", fill_pct=101), "fill_pct"),
        (reading("wastebin", fill_pct="87"), "fill_pct"),
        (reading("wastebin", colour="green"), "colour"),
        (reading("wastebin", ts="2026-11-26T08:15:00"), "ts"),
        (reading("wastebin", seq=-1), "seq"),
        (b"[1, 2, 3]", ""),
        (b'"a string"', ""),
        (orjson.dumps({"device_id": "wb-0042", "kind": "wastebin"}), ""),
    ],
)
def test_schema_errors_say_which_field(payload: bytes, mentions: str) -> None:
    result = rejected(make_validator().validate(topic("wastebin"), payload, NOW))
    assert result.reason is RejectReason.SCHEMA
    assert mentions in result.detail
    assert len(result.detail) <= MAX_DETAIL_CHARS


def test_payload_speaking_for_another_device_is_id_mismatch() -> None:
    payload = reading("wastebin", device_id="wb-0099")
    result = rejected(make_validator().validate(topic("wastebin"), payload, NOW))
    assert result.reason is RejectReason.ID_MISMATCH
    assert "wb-0099" in result.detail
    assert result.key == b"wb-0042"  # keyed by the topic's (authenticated) id


def test_payload_kind_differing_from_topic_kind_is_id_mismatch() -> None:
    payload = reading("parking", device_id="wb-0042")
    result = rejected(make_validator().validate(topic("wastebin"), payload, NOW))
    assert result.reason is RejectReason.ID_MISMATCH


def test_unknown_and_wrong_kind_devices() -> None:
    validator = make_validator()
    unknown = validator.validate(
        topic("wastebin", "wb-9999"), reading("wastebin", device_id="wb-9999"), NOW
    )
    assert rejected(unknown).reason is RejectReason.UNKNOWN_DEVICE
    # wb-0042 is registered as a waste bin; it may not report as a parking spot.
    wrong_kind = validator.validate(
        topic("parking", "wb-0042"), reading("parking", device_id="wb-0042"), NOW
    )
    assert rejected(wrong_kind).reason is RejectReason.UNKNOWN_DEVICE
    assert "wastebin" in rejected(wrong_kind).detail


def test_clock_skew_only_for_the_future() -> None:
    validator = make_validator()
    ahead = (NOW + timedelta(seconds=301)).isoformat()
    result = rejected(validator.validate(topic("parking"), reading("parking", ts=ahead), NOW))
    assert result.reason is RejectReason.CLOCK_SKEW
    just_inside = (NOW + timedelta(seconds=299)).isoformat()
    assert isinstance(
        validator.validate(topic("parking"), reading("parking", ts=just_inside), NOW), Accepted
    )
    last_year = (NOW - timedelta(days=365)).isoformat()
    assert isinstance(
        validator.validate(topic("parking"), reading("parking", ts=last_year), NOW), Accepted
    )


def test_rate_limit_per_device() -> None:
    validator = make_validator(burst=3)
    results = [
        validator.validate(topic("parking"), reading("parking", seq=n), NOW) for n in range(5)
    ]
    assert [isinstance(r, Accepted) for r in results] == [True, True, True, False, False]
    assert rejected(results[3]).reason is RejectReason.RATE_LIMITED
    # another device is not affected
    assert isinstance(validator.validate(topic("wastebin"), reading("wastebin"), NOW), Accepted)


def test_checks_run_in_contract_order() -> None:
    validator = make_validator()
    # Unknown device AND future ts AND bad schema: schema comes first.
    payload = reading("wastebin", device_id="wb-9999", ts="2030-01-01T00:00:00Z", fill_pct=900)
    assert (
        rejected(validator.validate(topic("wastebin", "wb-9999"), payload, NOW)).reason
        is RejectReason.SCHEMA
    )
    # Mismatch before registry lookup.
    payload = reading("wastebin", device_id="wb-0042")
    assert (
        rejected(validator.validate(topic("wastebin", "wb-9999"), payload, NOW)).reason
        is RejectReason.ID_MISMATCH
    )
    # Registry before clock skew.
    payload = reading("wastebin", device_id="wb-9999", ts="2030-01-01T00:00:00Z")
    assert (
        rejected(validator.validate(topic("wastebin", "wb-9999"), payload, NOW)).reason
        is RejectReason.UNKNOWN_DEVICE
    )


def test_status_messages_become_status_events() -> None:
    validator = make_validator()
    result = validator.validate(topic("streetlight", channel="status"), b'{"online": false}', NOW)
    assert isinstance(result, Accepted)
    assert result.topic == "t.st"
    event = decode_status(result.value)
    assert event.device_id == "sl-0001"
    assert event.kind is Kind.STREETLIGHT
    assert event.online is False
    assert event.received_at == NOW
    assert event.ingest_id == "ingest-test-1"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"offline", RejectReason.NOT_JSON),
        (b'{"online": "no"}', RejectReason.SCHEMA),
        (b'{"online": true, "extra": 1}', RejectReason.SCHEMA),
        (b'{"online": true, "ts": "2030-01-01T00:00:00Z"}', RejectReason.CLOCK_SKEW),
    ],
)
def test_bad_status_messages(payload: bytes, reason: RejectReason) -> None:
    result = make_validator().validate(topic("manhole", channel="status"), payload, NOW)
    assert rejected(result).reason is reason


def test_status_from_unknown_device() -> None:
    result = make_validator().validate("city/manhole/mh-7777/status", b'{"online": true}', NOW)
    assert rejected(result).reason is RejectReason.UNKNOWN_DEVICE


def test_deadletter_headers_carry_the_contract_fields() -> None:
    result = rejected(make_validator().validate(topic("wastebin"), b"nope", NOW))
    value, headers_list = deadletter_record(
        result.reason,
        result.detail,
        b"nope",
        mqtt_topic=topic("wastebin"),
        received_at=NOW,
        ingest_id="ingest-test-1",
        prefix_bytes=4096,
    )
    headers = dict(headers_list)
    assert value == b"nope"
    assert headers["reason"] == b"not_json"
    assert headers["detail"]
    assert headers["mqtt_topic"] == b"city/wastebin/wb-0042/telemetry"
    assert datetime.fromisoformat(headers["received_at"].decode()) == NOW


def test_huge_topics_are_clipped_in_headers() -> None:
    huge = "city/" + "x" * 10_000
    result = rejected(make_validator().validate(huge, b"{}", NOW))
    _, headers_list = deadletter_record(
        result.reason,
        result.detail,
        b"{}",
        mqtt_topic=huge,
        received_at=NOW,
        ingest_id="i",
        prefix_bytes=4096,
    )
    headers = dict(headers_list)
    assert len(headers["mqtt_topic"]) <= 1024
    assert len(result.detail) <= MAX_DETAIL_CHARS


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_the_record_is_exactly_what_encode_telemetry_makes(kind: str) -> None:
    """The validator builds the record its own (faster) way; the content must not differ."""
    validator = make_validator()
    optional = {"battery_pct": 55.5, "rssi_dbm": -71.0}
    for payload in (reading(kind), reading(kind, **optional), reading(kind, seq=2**63 - 1)):
        result = validator.validate(topic(kind), payload, NOW)
        assert isinstance(result, Accepted), result
        expected = encode_telemetry(
            parse_reading(payload), received_at=NOW, ingest_id="ingest-test-1"
        )
        assert orjson.loads(result.value) == orjson.loads(expected)
    later = NOW + timedelta(seconds=1)  # a new receive time is not served from the cache
    result = validator.validate(topic(kind), reading(kind, seq=8), later)
    assert isinstance(result, Accepted)
    assert decode_telemetry(result.value).received_at == later


def test_a_cached_topic_still_gets_every_check() -> None:
    validator = make_validator()
    first = validator.validate(topic("parking"), reading("parking"), NOW)
    assert isinstance(first, Accepted)
    spoof = validator.validate(topic("parking"), reading("parking", device_id="pk-0002"), NOW)
    assert rejected(spoof).reason is RejectReason.ID_MISMATCH
    assert rejected(spoof).key == b"pk-0001"
    big = validator.validate(topic("parking"), b" " * 5000, NOW)
    assert rejected(big).reason is RejectReason.TOO_LARGE


def test_the_topic_cache_is_bounded() -> None:
    validator = Validator(
        registry=DictRegistry(dict(REGISTRY)),
        telemetry_limiter=TokenBuckets(rate_per_s=1.0, burst=100),
        status_limiter=TokenBuckets(rate_per_s=1.0, burst=100),
        ingest_id="ingest-test-1",
        max_topics_cached=3,
    )
    for n in range(10):
        validator.validate(f"city/parking/pk-{n:04d}/telemetry", b"{}", NOW)
        assert len(validator._topics_seen) <= 3


@pytest.mark.parametrize("poison", CORPUS, ids=lambda p: p.name)
def test_the_poison_corpus_is_refused_with_its_reason_and_a_printable_detail(
    poison: Poison,
) -> None:
    device_id = str(FIELDS[poison.kind]["device_id"])
    result = rejected(make_validator().validate(topic(poison.kind), poison.payload(device_id), NOW))
    assert result.reason is poison.reason, result.detail
    assert result.detail.isprintable()
    result.detail.encode("utf-8")  # no lone surrogate can reach a header


@pytest.mark.parametrize(
    "bound",
    [
        Poison("first instant", "wastebin", '"ts":"2000-01-01T00:00:00Z"'),
        Poison("01:00 UTC on 2000-01-01", "wastebin", '"ts":"1999-12-31T20:00:00-05:00"'),
        Poison("largest gas_ppm", "manhole", GOOD_TS + ',"gas_ppm":1000000'),
        Poison("tiny power_w", "streetlight", GOOD_TS + ',"power_w":1e-300'),
        Poison("largest seq", "parking", GOOD_TS, seq=str(2**63 - 1)),
    ],
    ids=lambda p: p.name,
)
def test_the_bounds_around_the_poison_are_accepted(bound: Poison) -> None:
    device_id = str(FIELDS[bound.kind]["device_id"])
    result = make_validator().validate(topic(bound.kind), bound.payload(device_id), NOW)
    assert isinstance(result, Accepted), result


def test_a_status_ts_is_bounded_like_a_reading() -> None:
    validator = make_validator()
    status_topic = topic("manhole", channel="status")
    old = validator.validate(status_topic, b'{"online":true,"ts":"0001-01-01T00:00:00Z"}', NOW)
    assert rejected(old).reason is RejectReason.TS_OUT_OF_RANGE


def test_a_retained_delivery_is_refused_with_the_topics_device() -> None:
    result = make_validator().refuse_retained(topic("wastebin"))
    assert (result.reason, result.key, result.kind) == (
        RejectReason.RETAINED,
        b"wb-0042",
        Kind.WASTEBIN,
    )
    assert make_validator().refuse_retained("city/x/wb-0042").key == b"wb-0042"
