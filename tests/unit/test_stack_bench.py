"""The broker bench's raw MQTT CONNECT and the own-broker config renderer (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.broker import _remaining_length, connect_packet
from cityops.stack.mosquitto_instance import render_instance_conf


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
    ],
)
def test_remaining_length_is_mqtt_varint(length: int, encoded: bytes) -> None:
    assert _remaining_length(length) == encoded


def test_connect_packet_carries_id_credentials_and_clean_session() -> None:
    packet = connect_packet(client_id="wb-1", username="wb-1", password="pw", keepalive_s=600)
    body = (
        b"\x00\x04MQTT\x04"  # protocol name, level 4 (3.1.1)
        b"\xc2"  # username + password + clean session
        b"\x02\x58"  # keepalive 600
        b"\x00\x04wb-1\x00\x04wb-1\x00\x02pw"
    )
    assert packet == b"\x10" + bytes([len(body)]) + body


def test_instance_conf_is_the_stacks_with_only_port_and_directory_changed(tmp_path: Path) -> None:
    rendered = render_instance_conf(tmp_path, port=19_801)
    listeners = [line for line in rendered.splitlines() if line.startswith("listener")]
    assert listeners == ["listener 19801 127.0.0.1"]
    assert f"persistence_location {tmp_path}/data/" in rendered
    assert "1883" not in rendered
