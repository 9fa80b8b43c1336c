"""Bounded dead letters: the per-device reject budget, prefixes of long payloads, summaries."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from cityops.common.kinds import RejectReason
from cityops.ingest.deadletters import (
    RejectBudget,
    Suppressed,
    deadletter_record,
    summary_record,
)

NOW = datetime(2026, 12, 4, 5, 0, tzinfo=UTC)
TOO_LARGE = RejectReason.TOO_LARGE
NOT_JSON = RejectReason.NOT_JSON


def test_each_device_has_its_own_budget_and_past_it_rejects_are_counted_by_reason() -> None:
    budget = RejectBudget(rate_per_s=1.0, burst=2)
    admitted = [
        budget.admit(b"wb-1", TOO_LARGE, "city/wastebin/wb-1/telemetry", 0.0) for _ in "abcde"
    ]
    assert admitted == [True, True, False, False, False]
    assert budget.admit(b"wb-2", TOO_LARGE, "city/wastebin/wb-2/telemetry", 0.0)  # another device
    assert not budget.admit(b"wb-1", NOT_JSON, "city/wastebin/wb-1/telemetry", 0.5)
    assert budget.admit(b"wb-1", NOT_JSON, "city/wastebin/wb-1/telemetry", 1.6)  # refilled
    assert budget.pending
    assert sorted(budget.take_summaries(), key=lambda s: s.reason) == [
        Suppressed(b"wb-1", NOT_JSON, 1, "city/wastebin/wb-1/telemetry"),
        Suppressed(b"wb-1", TOO_LARGE, 3, "city/wastebin/wb-1/telemetry"),
    ]
    assert not budget.pending
    assert budget.take_summaries() == []


def test_rejects_without_a_device_share_one_budget() -> None:
    budget = RejectBudget(rate_per_s=0.001, burst=1)
    assert budget.admit(None, RejectReason.TOPIC, "a/b", 0.0)
    assert not budget.admit(None, RejectReason.TOPIC, "c/d", 0.0)
    assert budget.take_summaries() == [Suppressed(None, RejectReason.TOPIC, 1, "c/d")]


def test_the_counts_are_bounded_in_devices() -> None:
    budget = RejectBudget(rate_per_s=0.001, burst=1, max_devices=3)
    for n in range(10):
        key = f"wb-{n}".encode()
        budget.admit(key, NOT_JSON, "t", 0.0)
        budget.admit(key, NOT_JSON, "t", 0.0)  # the second of each device is suppressed
    summaries = budget.take_summaries()
    assert sum(s.count for s in summaries) == 10  # none lost...
    assert len(summaries) <= 4  # ...and beyond 3 devices they are counted without a key
    assert Suppressed(None, NOT_JSON, 7, "t") in summaries


def test_a_payload_within_the_prefix_is_kept_whole() -> None:
    value, headers = deadletter_record(
        NOT_JSON,
        "not JSON",
        b"x" * 4096,
        mqtt_topic="t",
        received_at=NOW,
        ingest_id="i",
        prefix_bytes=4096,
    )
    assert value == b"x" * 4096
    assert {name for name, _ in headers} == {
        "reason",
        "detail",
        "mqtt_topic",
        "received_at",
        "ingest_id",
    }


def test_a_longer_payload_keeps_its_prefix_size_and_sha256() -> None:
    payload = bytes(range(256)) * 1000
    value, headers = deadletter_record(
        TOO_LARGE,
        "too big",
        payload,
        mqtt_topic="t",
        received_at=NOW,
        ingest_id="i",
        prefix_bytes=1024,
    )
    found = dict(headers)
    assert value == payload[:1024]
    assert found["original_size"] == b"256000"
    assert found["sha256"] == hashlib.sha256(payload).hexdigest().encode()


def test_a_summary_has_no_payload_and_says_how_many_and_why() -> None:
    value, headers = summary_record(
        Suppressed(b"wb-1", TOO_LARGE, 98, "city/wastebin/wb-1/telemetry"),
        received_at=NOW,
        ingest_id="i",
    )
    found = dict(headers)
    assert value == b""
    assert found["reason"] == b"too_large"
    assert found["suppressed"] == b"98"
    assert b"98" in found["detail"]
    assert found["mqtt_topic"] == b"city/wastebin/wb-1/telemetry"
