"""The pure validation pipeline of A5: MQTT topic and payload bytes in, a Kafka record out.

size -> topic -> JSON -> schema -> topic/payload identity -> registry -> clock skew -> rate limit.
No I/O: the registry is a read-only view and the rate limiter is passed in, time is passed in.
The schema bounds every value to what the stores downstream accept (cityops.common.events): a
`ts` outside its window is `ts_out_of_range` (before 2000) or `clock_skew` (the future).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import orjson
from pydantic import ValidationError

from cityops.common.events import (
    READING_ADAPTER,
    STATUS_ADAPTER,
    Reading,
    StatusEvent,
    encode_status,
)
from cityops.common.kinds import Kind, RejectReason
from cityops.common.topics import (
    Channel,
    DeviceTopic,
    TopicError,
    is_valid_device_id,
    parse_topic,
)
from cityops.ingest.ratelimit import TokenBuckets

_READING_VALIDATOR = READING_ADAPTER.validator
_READING_SERIALIZER = READING_ADAPTER.serializer

MAX_DETAIL_CHARS = 400


class RegistryView(Protocol):
    """What validation needs from the device registry."""

    def kind_of(self, device_id: str) -> Kind | None:
        """The registered kind of an enabled device, or None if unknown or disabled."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid message and the Kafka record made from it."""

    topic: str
    key: bytes
    value: bytes
    kind: Kind
    channel: Channel
    measured_at: datetime | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused message: why, and the dead-letter key (the topic's device id when parseable)."""

    reason: RejectReason
    detail: str
    key: bytes | None
    kind: Kind | None = None
    channel: Channel | None = None


@dataclass(frozen=True, slots=True)
class OutputTopics:
    """Kafka topic names (A4)."""

    telemetry: str = "city.telemetry.v1"
    status: str = "city.status.v1"
    deadletter: str = "city.deadletter.v1"


def _schema_detail(exc: ValidationError) -> str:
    parts: list[str] = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _is_json_error(exc: ValidationError) -> bool:
    return any(error["type"] == "json_invalid" for error in exc.errors(include_url=False))


# The schema's own bounds on `ts` (events.SensorTime), by pydantic error type.
_TS_BOUND_REASONS = {
    "greater_than_equal": RejectReason.TS_OUT_OF_RANGE,
    "less_than": RejectReason.CLOCK_SKEW,
}


def _schema_reason(exc: ValidationError) -> RejectReason:
    """`schema`, unless the failure is `ts` outside its window (a reason of its own)."""
    for error in exc.errors(include_url=False, include_input=False):
        if error["loc"] and error["loc"][-1] == "ts" and error["type"] in _TS_BOUND_REASONS:
            return _TS_BOUND_REASONS[error["type"]]
    return RejectReason.SCHEMA


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Bound a free-text detail and make it printable UTF-8 (payload keys can hold NUL).

    A schema error names the offending key, which a hostile payload chooses: control
    characters are escaped and lone surrogates replaced, so a header never breaks a consumer.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Validator:
    """Turns one MQTT message into an Accepted record or a Rejected reason."""

    def __init__(
        self,
        *,
        registry: RegistryView,
        telemetry_limiter: TokenBuckets,
        status_limiter: TokenBuckets,
        ingest_id: str,
        topics: OutputTopics = OutputTopics(),
        max_payload_bytes: int = 4096,
        clock_skew_s: float = 300.0,
        max_topics_cached: int = 200_000,
    ) -> None:
        self._registry = registry
        self._telemetry_limiter = telemetry_limiter
        self._status_limiter = status_limiter
        self._ingest_id = ingest_id
        self._topics = topics
        self._max_payload_bytes = max_payload_bytes
        self._skew = timedelta(seconds=clock_skew_s)
        # Valid topics parsed before (a device publishes on the same two all its life).
        self._topics_seen: dict[str, tuple[DeviceTopic, bytes]] = {}
        self._max_topics_seen = max_topics_cached
        # The suffix `,"received_at":…,"ingest_id":…}` for the current receive time.
        self._suffix_at: datetime | None = None
        self._suffix = b""

    @property
    def topics(self) -> OutputTopics:
        """Where accepted and rejected records go."""
        return self._topics

    def validate(self, mqtt_topic: str, payload: bytes, now: datetime) -> Accepted | Rejected:
        """Run every check in order; the first failure decides the reason."""
        parsed = self._topics_seen.get(mqtt_topic)
        if parsed is None:
            try:
                where = parse_topic(mqtt_topic)
            except TopicError as exc:
                key = _device_id_guess(mqtt_topic)
                if len(payload) > self._max_payload_bytes:
                    return Rejected(RejectReason.TOO_LARGE, self._too_large(payload), key)
                return Rejected(RejectReason.TOPIC, clip(str(exc)), key)
            if len(self._topics_seen) >= self._max_topics_seen:
                self._topics_seen.clear()  # a forgotten topic is merely parsed again
            parsed = self._topics_seen[mqtt_topic] = (where, where.device_id.encode())
        where, key = parsed
        if len(payload) > self._max_payload_bytes:
            return Rejected(
                RejectReason.TOO_LARGE, self._too_large(payload), key, where.kind, where.channel
            )
        if where.channel is Channel.TELEMETRY:
            return self._telemetry(where, key, payload, now)
        return self._status(where, key, payload, now)

    def refuse_retained(self, mqtt_topic: str) -> Rejected:
        """A delivery with RETAIN set: a stored message replayed at subscribe, not a reading."""
        detail = "delivered with RETAIN set: a replay of a stored message, not a new one"
        try:
            where = parse_topic(mqtt_topic)
        except TopicError:
            return Rejected(RejectReason.RETAINED, detail, _device_id_guess(mqtt_topic))
        return Rejected(
            RejectReason.RETAINED, detail, where.device_id.encode(), where.kind, where.channel
        )

    def _too_large(self, payload: bytes) -> str:
        return f"payload is {len(payload)} bytes; the limit is {self._max_payload_bytes}"

    def _telemetry(
        self, where: DeviceTopic, key: bytes, payload: bytes, now: datetime
    ) -> Accepted | Rejected:
        def reject(reason: RejectReason, detail: str) -> Rejected:
            return Rejected(reason, clip(detail), key, where.kind, where.channel)

        try:
            # The adapter's core validator: TypeAdapter.validate_json's Python wrapper costs as
            # much as the validation itself (same schema, same result as `parse_reading`).
            reading: Reading = _READING_VALIDATOR.validate_json(payload)
        except ValidationError as exc:
            if _is_json_error(exc):
                return reject(RejectReason.NOT_JSON, f"not JSON: {exc.errors()[0]['msg']}")
            return reject(_schema_reason(exc), _schema_detail(exc))
        if reading.device_id != where.device_id:
            return reject(
                RejectReason.ID_MISMATCH,
                f"payload device_id {reading.device_id!r} differs from topic device "
                f"{where.device_id!r}",
            )
        if reading.kind != where.kind:
            return reject(
                RejectReason.ID_MISMATCH,
                f"payload kind {reading.kind!r} differs from topic kind {where.kind.value!r}",
            )
        refused = self._registered(where)
        if refused is not None:
            return reject(RejectReason.UNKNOWN_DEVICE, refused)
        if reading.ts - now > self._skew:
            return reject(RejectReason.CLOCK_SKEW, self._skew_detail(reading.ts, now))
        if not self._telemetry_limiter.allow(where.device_id, reading.ts.timestamp()):
            return reject(RejectReason.RATE_LIMITED, "device exceeded its reading rate budget")
        value = self._encode_telemetry(reading, now)
        return Accepted(self._topics.telemetry, key, value, where.kind, where.channel, reading.ts)

    def _status(
        self, where: DeviceTopic, key: bytes, payload: bytes, now: datetime
    ) -> Accepted | Rejected:
        def reject(reason: RejectReason, detail: str) -> Rejected:
            return Rejected(reason, clip(detail), key, where.kind, where.channel)

        try:
            status = STATUS_ADAPTER.validate_json(payload)
        except ValidationError as exc:
            if _is_json_error(exc):
                return reject(RejectReason.NOT_JSON, f"not JSON: {exc.errors()[0]['msg']}")
            return reject(_schema_reason(exc), _schema_detail(exc))
        refused = self._registered(where)
        if refused is not None:
            return reject(RejectReason.UNKNOWN_DEVICE, refused)
        if status.ts is not None and status.ts - now > self._skew:
            return reject(RejectReason.CLOCK_SKEW, self._skew_detail(status.ts, now))
        at = (status.ts or now).timestamp()
        if not self._status_limiter.allow(where.device_id, at):
            return reject(RejectReason.RATE_LIMITED, "device exceeded its status message budget")
        event = StatusEvent(
            device_id=where.device_id,
            kind=where.kind,
            online=status.online,
            ts=status.ts,
            received_at=now,
            ingest_id=self._ingest_id,
        )
        return Accepted(
            self._topics.status, key, encode_status(event), where.kind, where.channel, status.ts
        )

    def _encode_telemetry(self, reading: Reading, now: datetime) -> bytes:
        """`encode_telemetry`'s record, built from pydantic's own JSON plus a cached suffix.

        The same fields and values (tested against `encode_telemetry`) at about half the cost:
        no intermediate dict, and `received_at` is formatted once per received batch.
        """
        if now is not self._suffix_at:
            self._suffix_at = now
            self._suffix = (
                b',"received_at":'
                + orjson.dumps(now.isoformat())
                + b',"ingest_id":'
                + orjson.dumps(self._ingest_id)
                + b"}"
            )
        body: bytes = _READING_SERIALIZER.to_json(reading, exclude_none=True)
        return body[:-1] + self._suffix

    def _registered(self, where: DeviceTopic) -> str | None:
        """None when the topic's device is registered, enabled and of the topic's kind."""
        kind = self._registry.kind_of(where.device_id)
        if kind is None:
            return f"device {where.device_id!r} is not registered (or is disabled)"
        if kind is not where.kind:
            return (
                f"device {where.device_id!r} is registered as {kind.value}, not {where.kind.value}"
            )
        return None

    def _skew_detail(self, ts: datetime, now: datetime) -> str:
        ahead = (ts - now).total_seconds()
        return (
            f"ts {ts.isoformat()} is {ahead:.0f} s ahead of the ingest clock "
            f"(limit {self._skew.total_seconds():.0f} s)"
        )


def _device_id_guess(mqtt_topic: str) -> bytes | None:
    """The device id of a malformed topic when it sits where a device id belongs."""
    parts = mqtt_topic.split("/")
    if len(parts) >= 3 and parts[0] == "city" and is_valid_device_id(parts[2]):
        return parts[2].encode()
    return None
