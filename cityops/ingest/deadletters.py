"""Bounded dead letters (A5): what a rejected message leaves in `city.deadletter.v1`.

Each device (the dead letter's key; one shared budget for messages whose topic names none) has
a token bucket of rejects, timed by arrival. While it has tokens, a reject is copied: the
original bytes, or for a payload longer than the prefix bound its first bytes with
`original_size` and `sha256` headers. Past the budget a reject is only counted; once per
summary interval each (device, reason) with suppressed rejects gets one record with an empty
value and `suppressed: <count>`. So one device flooding 200 KB payloads leaves its burst of
prefixes plus a few small summaries, not a copy of everything it sent (issue 12, row 7).
Pure: time is passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cityops.common.kinds import RejectReason
from cityops.ingest.ratelimit import TokenBuckets

MAX_TOPIC_HEADER_BYTES = 1024
_NO_KEY = ""  # the bucket of rejects whose topic names no device


@dataclass(frozen=True, slots=True)
class Suppressed:
    """Rejects of one device and reason that were counted instead of copied."""

    key: bytes | None
    reason: RejectReason
    count: int
    mqtt_topic: str


@dataclass(slots=True)
class _Count:
    count: int
    mqtt_topic: str  # the last one seen


class RejectBudget:
    """Per-device token buckets of rejects, and the counts of those past the budget."""

    def __init__(self, *, rate_per_s: float, burst: float, max_devices: int = 100_000) -> None:
        self._buckets = TokenBuckets(rate_per_s=rate_per_s, burst=burst, max_keys=max_devices)
        self._max_devices = max_devices
        self._suppressed: dict[tuple[bytes | None, RejectReason], _Count] = {}

    def admit(self, key: bytes | None, reason: RejectReason, mqtt_topic: str, at: float) -> bool:
        """True: copy this reject. False: it was counted for the next summary instead."""
        device = key.decode() if key is not None else _NO_KEY
        if self._buckets.allow(device, at):
            return True
        slot = (key, reason)
        counted = self._suppressed.get(slot)
        if counted is None:
            if len(self._suppressed) >= self._max_devices:
                slot = (None, reason)  # bounded memory: the overflow is counted without a key
            counted = self._suppressed.setdefault(slot, _Count(0, mqtt_topic))
        counted.count += 1
        counted.mqtt_topic = mqtt_topic
        return False

    @property
    def pending(self) -> bool:
        """Some rejects were suppressed since the last summary."""
        return bool(self._suppressed)

    def take_summaries(self) -> list[Suppressed]:
        """The counts since the last call, one per (device, reason); resets them."""
        taken, self._suppressed = self._suppressed, {}
        return [
            Suppressed(key, reason, counted.count, counted.mqtt_topic)
            for (key, reason), counted in taken.items()
        ]


def _common_headers(
    reason: RejectReason, detail: str, *, mqtt_topic: str, received_at: datetime, ingest_id: str
) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.value.encode()),
        ("detail", detail.encode()),
        ("mqtt_topic", mqtt_topic.encode("utf-8", "replace")[:MAX_TOPIC_HEADER_BYTES]),
        ("received_at", received_at.isoformat().encode()),
        ("ingest_id", ingest_id.encode()),
    ]


def deadletter_record(
    reason: RejectReason,
    detail: str,
    payload: bytes,
    *,
    mqtt_topic: str,
    received_at: datetime,
    ingest_id: str,
    prefix_bytes: int,
) -> tuple[bytes, Sequence[tuple[str, bytes]]]:
    """The value and A4 headers of one copied reject; a long payload keeps only a prefix."""
    headers = _common_headers(
        reason, detail, mqtt_topic=mqtt_topic, received_at=received_at, ingest_id=ingest_id
    )
    if len(payload) <= prefix_bytes:
        return payload, headers
    headers.append(("original_size", str(len(payload)).encode()))
    headers.append(("sha256", hashlib.sha256(payload).hexdigest().encode()))
    return payload[:prefix_bytes], headers


def summary_record(
    suppressed: Suppressed, *, received_at: datetime, ingest_id: str
) -> tuple[bytes, Sequence[tuple[str, bytes]]]:
    """The value (empty) and headers of the record that stands for suppressed rejects."""
    detail = (
        f"{suppressed.count} more {suppressed.reason.value} rejects past the device's "
        "dead-letter budget were counted, not copied"
    )
    headers = _common_headers(
        suppressed.reason,
        detail,
        mqtt_topic=suppressed.mqtt_topic,
        received_at=received_at,
        ingest_id=ingest_id,
    )
    headers.append(("suppressed", str(suppressed.count).encode()))
    return b"", headers
