"""MQTT topic names: `city/{kind}/{device_id}/{channel}` (A2), and Kafka topic configs (A4)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from cityops.common.kinds import KINDS, Kind

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.-]{3,64}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
TOPIC_ROOT = "city"
# Never device ids, nor their `-` extensions: the broker binds a device's client id to its id
# (or id-suffix), and these are the MQTT service accounts and the prefixes of the services'
# client ids (ingest-<host>-<n>, cityops-sim-..., cityops-stack-probe-...). The auth plugin
# gets the same list (deploy/mosquitto/mosquitto.conf, plugin_opt_reserved_ids).
RESERVED_DEVICE_IDS = ("ingest", "gateway", "dispatcher", "cityops")

# The dead-letter topic is written by anyone who can reach ingest with bad bytes: it gets a size
# cap (per partition; Kafka deletes whole closed segments, so a partition holds at most about
# retention.bytes + segment.bytes) on top of the usual 7 days. Applied where topics are created
# (cityops.common.kafka.ensure_topics), also to an existing topic.
DEADLETTER_TOPIC_CONFIG: Mapping[str, str] = MappingProxyType(
    {
        "retention.bytes": str(64 * 1024 * 1024),
        "segment.bytes": str(16 * 1024 * 1024),
        "retention.ms": str(7 * 24 * 3600 * 1000),
    }
)


class Channel(StrEnum):
    """What a device publishes on a topic."""

    TELEMETRY = "telemetry"
    STATUS = "status"


class TopicError(ValueError):
    """An MQTT topic that is not `city/{kind}/{device_id}/{telemetry|status}`."""


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic."""

    kind: Kind
    device_id: str
    channel: Channel


def is_valid_device_id(device_id: str) -> bool:
    """Return whether `device_id` is 3-64 characters of `[A-Za-z0-9_.-]`."""
    return _DEVICE_ID_RE.fullmatch(device_id) is not None


def is_reserved_device_id(device_id: str) -> bool:
    """Whether `device_id` is a reserved name or one of them followed by `-`."""
    return any(
        device_id == name or device_id.startswith(f"{name}-") for name in RESERVED_DEVICE_IDS
    )


def parse_topic(topic: str) -> DeviceTopic:
    """Parse a device topic, raising TopicError that says what is wrong."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT:
        raise TopicError(f"expected {TOPIC_ROOT}/{{kind}}/{{device_id}}/{{channel}}, got {topic!r}")
    _, kind, device_id, channel = parts
    if kind not in KINDS:
        raise TopicError(f"unknown kind {kind!r} in topic")
    if not is_valid_device_id(device_id):
        raise TopicError(f"invalid device id {device_id!r} in topic")
    if channel not in (Channel.TELEMETRY, Channel.STATUS):
        raise TopicError(f"unknown channel {channel!r} in topic")
    return DeviceTopic(Kind(kind), device_id, Channel(channel))


def device_topic(kind: Kind | str, device_id: str, channel: Channel | str) -> str:
    """Format the topic a device publishes `channel` on."""
    return f"{TOPIC_ROOT}/{Kind(kind).value}/{device_id}/{Channel(channel).value}"


def telemetry_topic(kind: Kind | str, device_id: str) -> str:
    """Format a device's telemetry topic."""
    return device_topic(kind, device_id, Channel.TELEMETRY)


def status_topic(kind: Kind | str, device_id: str) -> str:
    """Format a device's status (online/offline, last will) topic."""
    return device_topic(kind, device_id, Channel.STATUS)
