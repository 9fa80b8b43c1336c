"""MQTT topic parsing and formatting (A2)."""

from __future__ import annotations

import pytest

from cityops.common.kinds import Kind
from cityops.common.topics import (
    Channel,
    TopicError,
    is_reserved_device_id,
    is_valid_device_id,
    parse_topic,
    status_topic,
    telemetry_topic,
)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("channel", list(Channel))
def test_format_then_parse_round_trips(kind: Kind, channel: Channel) -> None:
    topic = (
        telemetry_topic(kind, "dev-01")
        if channel is Channel.TELEMETRY
        else status_topic(kind, "dev-01")
    )
    parsed = parse_topic(topic)
    assert (parsed.kind, parsed.device_id, parsed.channel) == (kind, "dev-01", channel)


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("city/wastebin/wb-1/telemetry/extra", "expected"),
        ("city/wastebin/telemetry", "expected"),
        ("town/wastebin/wb-001/telemetry", "expected"),
        ("city/toaster/wb-001/telemetry", "unknown kind"),
        ("city/wastebin/wb/telemetry", "invalid device id"),
        ("city/wastebin/wb 001/telemetry", "invalid device id"),
        ("city/wastebin/" + "x" * 65 + "/telemetry", "invalid device id"),
        ("city/wastebin/wb-001/commands", "unknown channel"),
        ("", "expected"),
    ],
)
def test_malformed_topics_say_what_is_wrong(topic: str, why: str) -> None:
    with pytest.raises(TopicError, match=why):
        parse_topic(topic)


def test_device_id_rule() -> None:
    assert is_valid_device_id("abc")
    assert is_valid_device_id("A.b_c-9" * 9)  # 63 chars
    assert not is_valid_device_id("ab")
    assert not is_valid_device_id("a+b")
    assert not is_valid_device_id("é-device")


@pytest.mark.parametrize(
    "device_id",
    ["ingest", "gateway", "dispatcher", "cityops", "ingest-host-0", "cityops-sim-x-1"],
)
def test_service_names_and_their_dash_extensions_are_reserved(device_id: str) -> None:
    assert is_reserved_device_id(device_id)


@pytest.mark.parametrize("device_id", ["wb-0001", "ingestor", "gateways-1", "my-ingest", "city"])
def test_ordinary_ids_are_not_reserved(device_id: str) -> None:
    assert not is_reserved_device_id(device_id)
