"""Fault injection: messages built on purpose to be refused by ingest with each A5 reason.

Each builder is pure: it takes a valid reading (as the JSON-ready dict a device would send)
and returns the topic and bytes a broken or misbehaving device would publish instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from cityops.common.events import MAX_PAYLOAD_BYTES
from cityops.common.kinds import RejectReason
from cityops.common.topics import TOPIC_ROOT, telemetry_topic
from cityops.simulator.behaviours import format_ts

CLOCK_SKEW_AHEAD = timedelta(minutes=10)  # the contract tolerates 5 minutes
UNSET_CLOCK = "1970-01-01T00:00:07Z"  # a sensor whose real-time clock lost its time
DEFAULT_RATE_LIMIT_BURST = 200
# What a simulated device can cause; `retained` needs a RETAIN flag the simulator does not set,
# `unprocessable` is ingest's own failure.
INJECTABLE: tuple[RejectReason, ...] = tuple(
    r for r in RejectReason if r not in {RejectReason.RETAINED, RejectReason.UNPROCESSABLE}
)


@dataclass(frozen=True, slots=True)
class FaultMessage:
    """One message a faulty device publishes."""

    reason: RejectReason
    topic: str
    payload: bytes


class FaultSpecError(ValueError):
    """A `--faults` value that names no rejection reason."""


def parse_fault_spec(spec: str) -> tuple[RejectReason, ...]:
    """Parse `--faults`: `none`, `all`, or a comma-separated list of A5 reasons."""
    text = spec.strip().lower()
    if text in {"", "none"}:
        return ()
    if text == "all":
        return INJECTABLE
    reasons: list[RejectReason] = []
    for part in text.split(","):
        name = part.strip()
        reason = next((r for r in INJECTABLE if r.value == name), None)
        if reason is None:
            known = ", ".join(r.value for r in INJECTABLE)
            raise FaultSpecError(f"unknown fault {name!r}; expected all, none or: {known}")
        if reason not in reasons:
            reasons.append(reason)
    return tuple(reasons)


def _dump(reading: dict[str, Any]) -> bytes:
    return orjson.dumps(reading)


def too_large(reading: dict[str, Any]) -> FaultMessage:
    """Well-formed JSON over the 4 KiB cap (a firmware dumping its debug log)."""
    padded = dict(reading, debug_log="x" * (MAX_PAYLOAD_BYTES + 512))
    return FaultMessage(
        RejectReason.TOO_LARGE,
        telemetry_topic(reading["kind"], reading["device_id"]),
        _dump(padded),
    )


def not_json(reading: dict[str, Any]) -> FaultMessage:
    """Bytes that are not JSON (a device sending its binary frame on the JSON topic)."""
    return FaultMessage(
        RejectReason.NOT_JSON,
        telemetry_topic(reading["kind"], reading["device_id"]),
        b"\x02\xff\x10fill=87.5;temp=14.2\x03",
    )


def schema(reading: dict[str, Any]) -> FaultMessage:
    """JSON with a required field missing and a value out of range."""
    broken = {key: value for key, value in reading.items() if key != "seq"}
    broken["battery_pct"] = 180.0
    return FaultMessage(
        RejectReason.SCHEMA, telemetry_topic(reading["kind"], reading["device_id"]), _dump(broken)
    )


def bad_topic(reading: dict[str, Any]) -> FaultMessage:
    """A topic with a kind the city does not have (a mis-configured gateway)."""
    return FaultMessage(
        RejectReason.TOPIC, f"{TOPIC_ROOT}/toaster/{reading['device_id']}/telemetry", _dump(reading)
    )


def id_mismatch(reading: dict[str, Any], *, other_device_id: str) -> FaultMessage:
    """A reading published on another (real) device's topic."""
    return FaultMessage(
        RejectReason.ID_MISMATCH, telemetry_topic(reading["kind"], other_device_id), _dump(reading)
    )


def unknown_device(reading: dict[str, Any], *, ghost_device_id: str) -> FaultMessage:
    """A valid reading from a device the registry has never heard of."""
    ghost = dict(reading, device_id=ghost_device_id)
    return FaultMessage(
        RejectReason.UNKNOWN_DEVICE, telemetry_topic(reading["kind"], ghost_device_id), _dump(ghost)
    )


def clock_skew(reading: dict[str, Any], *, wall_now: datetime) -> FaultMessage:
    """A reading stamped 10 minutes in the future (a device whose RTC drifted)."""
    skewed = dict(reading, ts=format_ts(wall_now + CLOCK_SKEW_AHEAD))
    return FaultMessage(
        RejectReason.CLOCK_SKEW,
        telemetry_topic(reading["kind"], reading["device_id"]),
        _dump(skewed),
    )


def ts_out_of_range(reading: dict[str, Any]) -> FaultMessage:
    """A reading stamped 1970 (a device whose real-time clock reset)."""
    return FaultMessage(
        RejectReason.TS_OUT_OF_RANGE,
        telemetry_topic(reading["kind"], reading["device_id"]),
        _dump(dict(reading, ts=UNSET_CLOCK)),
    )


def rate_limited(readings: Iterable[dict[str, Any]]) -> list[FaultMessage]:
    """A burst of valid readings at once (a stuck firmware loop); the tail is rate limited."""
    return [
        FaultMessage(
            RejectReason.RATE_LIMITED, telemetry_topic(r["kind"], r["device_id"]), _dump(r)
        )
        for r in readings
    ]
