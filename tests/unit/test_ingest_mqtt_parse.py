"""The PUBLISH fast path: 3.1.1 QoS 1 packets parsed from the read buffer, paho for the rest."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from cityops.ingest.mqtt_source import Backoff, Inbound, MqttSource, parse_qos1_publishes
from tests.helpers import wait_for


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(mid: int, topic: bytes, payload: bytes, *, qos: int = 1, dup: bool = False) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet, encoded from the spec (section 3.3)."""
    header = 0x30 | (qos << 1) | (0x08 if dup else 0)
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    body += payload
    return bytes([header]) + varint(len(body)) + body


Parsed = list[tuple[int, bytes, bytes]]


def parse(buf: bytes, pos: int = 0, limit: int = 1000) -> tuple[int, Parsed]:
    out: Parsed = []
    return parse_qos1_publishes(buf, pos, limit, out), out


def test_consecutive_publishes_are_parsed_with_their_ids_topics_and_payloads() -> None:
    buf = publish(1, b"city/parking/pk-1/telemetry", b'{"a":1}') + publish(
        65535, b"city/parking/pk-2/status", b""
    )
    end, out = parse(buf)
    assert end == len(buf)
    assert out == [
        (1, b"city/parking/pk-1/telemetry", b'{"a":1}'),
        (65535, b"city/parking/pk-2/status", b""),
    ]


@pytest.mark.parametrize("size", [0, 100, 127 - 4 - 5, 200, 16_384, 70_000])
def test_every_remaining_length_encoding_is_read(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = publish(7, b"t/x", payload)
    end, out = parse(packet)
    assert (end, out) == (len(packet), [(7, b"t/x", payload)])


def retained(packet: bytes) -> bytes:
    return bytes([packet[0] | 0x01]) + packet[1:]


def test_the_dup_flag_does_not_matter_and_raw_topic_bytes_are_kept() -> None:
    buf = publish(2, b"city/\xff\xfe/x", b"p", dup=True) + publish(3, b"t", b"r")
    end, out = parse(buf)
    assert end == len(buf)
    assert out == [(2, b"city/\xff\xfe/x", b"p"), (3, b"t", b"r")]


def test_a_retained_publish_is_left_for_paho() -> None:
    first = publish(1, b"t", b"a")
    end, out = parse(first + retained(publish(2, b"t", b"b")) + publish(3, b"t", b"c"))
    assert (end, out) == (len(first), [(1, b"t", b"a")])


@pytest.mark.parametrize(
    "other",
    [
        publish(0, b"t", b"qos0", qos=0),
        publish(5, b"t", b"qos2", qos=2),
        b"\xd0\x00",  # PINGRESP
        b"\x90\x03\x00\x01\x01",  # SUBACK
    ],
)
def test_parsing_stops_at_anything_that_is_not_a_qos1_publish(other: bytes) -> None:
    first = publish(1, b"t", b"a")
    end, out = parse(first + other + publish(2, b"t", b"b"))
    assert end == len(first)
    assert out == [(1, b"t", b"a")]


def test_an_incomplete_packet_is_left_in_the_buffer() -> None:
    first, second = publish(1, b"t", b"a"), publish(2, b"topic", b"x" * 300)
    for cut in range(len(second)):  # every split point, including inside the length varint
        end, out = parse(first + second[:cut])
        assert (end, out) == (len(first), [(1, b"t", b"a")])


def test_a_malformed_packet_is_left_for_paho_to_refuse() -> None:
    topic_too_long = b"\x32\x04\x00\x09ab"  # topic length 9 in a 4-byte body
    no_room_for_id = b"\x32\x03\x00\x01t"  # no packet id
    five_byte_length = b"\x32\xff\xff\xff\xff\x01" + bytes(10)
    for bad in (topic_too_long, no_room_for_id, five_byte_length):
        assert parse(bad) == (0, [])


def test_the_limit_and_start_position_are_honoured() -> None:
    packets = [publish(n, b"t", str(n).encode()) for n in range(1, 6)]
    buf = b"".join(packets)
    end, out = parse(buf, 0, 2)
    assert [m for m, _, _ in out] == [1, 2]
    assert end == len(packets[0]) + len(packets[1])
    end2, rest = parse(buf, end)
    assert [m for m, _, _ in rest] == [3, 4, 5]
    assert end2 == len(buf)


class FakeSocket:
    """Stands in for the connected socket: reads come from the buffer the test fills."""


MakeSource = Callable[..., MqttSource]


@pytest.fixture
def make_source() -> Iterator[MakeSource]:
    """MqttSources that look connected (generation 4) without a broker; detached afterwards."""
    made: list[MqttSource] = []

    def make(received: list[Inbound], protocol: str = "3.1.1") -> MqttSource:
        new = MqttSource(
            host="127.0.0.1",
            port=1883,
            username="u",
            password="p",
            client_id="unit",
            share_group="g",
            protocol=protocol,
            receive_maximum=1000,
            session_expiry_s=60,
            keepalive_s=30,
            on_messages=received.extend,
        )
        new._sock = new._client._sock = FakeSocket()  # type: ignore[assignment]
        new.generation = 4
        made.append(new)
        return new

    yield make
    for source in made:  # paho would close the fake socket when collected
        source._sock = source._client._sock = None


def feed(made: MqttSource, data: bytes) -> None:
    made._client.rbuf += data
    made._drain_buffer()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 100_000])
def test_the_source_yields_every_message_once_in_order_however_the_bytes_arrive(
    chunk: int, make_source: MakeSource
) -> None:
    """Fast path and paho share the buffer: a packet split across reads is finished by paho."""
    expected = [
        (n, f"city/wastebin/wb-{n:04d}/telemetry".encode(), b"x" * (n * 37 % 500))
        for n in range(1, 301)
    ]
    stream = b"".join(publish(*m) for m in expected)
    received: list[Inbound] = []
    made = make_source(received)
    for start in range(0, len(stream), chunk):
        feed(made, stream[start : start + chunk])
    assert [(m.mid, m.topic, m.payload) for m in received] == expected
    assert {m.generation for m in received} == {4}
    assert not made._client.rbuf
    assert made._client._in_packet["command"] == 0  # paho holds no half-read packet


def test_paho_finishes_a_packet_it_started_before_the_fast_path_resumes(
    make_source: MakeSource,
) -> None:
    received: list[Inbound] = []
    made = make_source(received)
    first, second = publish(1, b"t/a", b"one"), publish(2, b"t/b", b"two")
    feed(made, first[:3])  # incomplete: paho takes the header and waits for the rest
    assert made._client._in_packet["command"] == 0x32
    assert received == []
    feed(made, first[3:] + second)
    assert [(m.mid, m.payload) for m in received] == [(1, b"one"), (2, b"two")]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_retained_deliveries_are_marked_and_the_others_are_not(
    protocol: str, make_source: MakeSource
) -> None:
    """RETAIN comes through paho's path onto Inbound.retained, between fast-path messages."""
    received: list[Inbound] = []
    made = make_source(received, protocol=protocol)
    v5_props = b"\x00" if protocol == "5" else b""

    def packet(mid: int, payload: bytes) -> bytes:
        topic = b"city/parking/pk-1/telemetry"
        body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + v5_props + payload
        return bytes([0x32]) + varint(len(body)) + body

    feed(made, packet(1, b"live") + retained(packet(2, b"replay")) + packet(3, b"live"))
    assert [(m.mid, m.payload, m.retained) for m in received] == [
        (1, b"live", False),
        (2, b"replay", True),
        (3, b"live", False),
    ]


def test_mqtt5_framing_goes_through_paho(make_source: MakeSource) -> None:
    received: list[Inbound] = []
    made = make_source(received, protocol="5")
    topic = b"city/parking/pk-1/telemetry"
    body = len(topic).to_bytes(2, "big") + topic + (9).to_bytes(2, "big") + b"\x00" + b"{}"
    feed(made, bytes([0x32]) + varint(len(body)) + body)  # v5: empty property length 0
    assert [(m.mid, m.topic, m.payload) for m in received] == [(9, topic, b"{}")]


class Loop:
    """Records call_soon; enough of an event loop for `ack`."""

    def __init__(self) -> None:
        self.soon: list[Any] = []

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.soon.append((callback, args))


def test_acks_are_puback_packets_written_once_per_loop_turn_and_only_for_this_connection(
    make_source: MakeSource,
) -> None:
    made = make_source([])
    loop = Loop()
    made._loop = loop  # type: ignore[assignment]
    a, b = socket.socketpair()
    try:
        made._sock = a
        made._client.wbuf.clear()
        made.ack(1, 4)
        made.ack(0x1234, 4)
        made.ack(9, 3)  # an earlier connection's message: the broker redelivers it instead
        assert len(loop.soon) == 1  # one flush scheduled for both
        callback, args = loop.soon[0]
        callback(*args)
        assert b.recv(100) == b"\x40\x02\x00\x01" + b"\x40\x02\x12\x34"
        assert made.acks_sent == 2
    finally:
        a.close()
        b.close()


class ScriptedConnections:
    """Plays a broker's answers to successive connection attempts through the real callbacks."""

    def __init__(self, made: MqttSource, script: list[str]) -> None:
        self.made = made
        self.script = script
        self.attempts = 0

    def __call__(self) -> None:
        step = self.script[self.attempts] if self.attempts < len(self.script) else "refused"
        self.attempts += 1
        made = self.made
        loop = asyncio.get_running_loop()
        if step == "refused":
            raise ConnectionRefusedError("broker down")
        flags = paho.ConnectFlags(session_present=True)
        made._on_connect(
            made._client, None, flags, ReasonCode(PacketTypes.CONNACK, "Success"), None
        )
        code = "Granted QoS 1" if step == "granted" else "Not authorized"
        suback = [ReasonCode(PacketTypes.SUBACK, code)]
        loop.call_soon(made._on_subscribe, made._client, None, 1, suback, None)
        flags_gone = paho.DisconnectFlags(is_disconnect_packet_from_server=False)
        disconnect = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
        loop.call_later(0.01, made._on_disconnect, made._client, None, flags_gone, disconnect, None)


async def test_the_backoff_starts_over_after_a_granted_subscription(
    caplog: pytest.LogCaptureFixture, make_source: MakeSource
) -> None:
    """Issue 11 row 4: the old loop read `connected` after the disconnect had cleared it."""
    made = make_source([])
    made._sock = made._client._sock = None
    made._backoff = Backoff(first_s=0.01, base_s=0.02, cap_s=0.08)
    script = ["granted", "refused", "refused", "granted", "denied", "denied", "refused", "granted"]
    connections = ScriptedConnections(made, script)
    made._connect = connections  # type: ignore[method-assign]
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="cityops.ingest.mqtt_source")
    task = asyncio.create_task(made.run(stop))
    await wait_for(lambda: connections.attempts > len(script), timeout=10)
    stop.set()
    await task
    delays = [
        r.__dict__["retry_in_s"]
        for r in caplog.records
        if r.getMessage().startswith("mqtt reconnecting")
    ]
    # granted: fast retry; refusals back off; a refused subscription counts as no connection
    assert delays[:8] == [0.01, 0.02, 0.04, 0.01, 0.02, 0.04, 0.08, 0.01]


def test_backoff_is_fast_first_then_doubles_to_the_cap() -> None:
    backoff = Backoff(first_s=0.1, base_s=0.5, cap_s=3.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.1, 0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert [backoff.next_delay() for _ in range(2)] == [0.1, 0.5]
