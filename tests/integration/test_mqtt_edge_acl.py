"""The broker's edge against a device with valid credentials acting as an attacker (issue 11).

Each case runs against the stack's broker (Mosquitto 2.0.21 + the cityops auth plugin): a
device subscribing beyond its own commands, to `city/#`, `#`, `$SYS/#` or `$share/...`, a
retained publish, another client's id, more sessions than the cap, and a socket that never
sends CONNECT. A refused SUBSCRIBE must also route nothing to the attacker, and a share group
the attacker tried to join must keep getting every message.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import pytest
import pytest_asyncio
from paho.mqtt.enums import MQTTProtocolVersion

from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MqttSettings, ProvisionDevice

pytestmark = pytest.mark.mqtt

NOT_AUTHORIZED = 0x87
REFUSED_SUBACK = {0x80, NOT_AUTHORIZED}  # MQTT 3.1.1 failure, MQTT 5 "not authorized"


@dataclass
class Edge:
    """The shared broker, an attacking device and a victim device (both provisioned)."""

    mqtt: MqttSettings
    env: Mapping[str, str]
    attacker: str
    attacker_password: str
    victim: str
    victim_password: str
    clients: list[MqttTestClient]

    def client(
        self,
        username: str | None,
        password: str | None,
        *,
        client_id: str = "",
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> MqttTestClient:
        made = MqttTestClient(
            self.mqtt.host, self.mqtt.port, username, password, protocol, client_id=client_id
        )
        self.clients.append(made)
        return made

    async def connected(self, client: MqttTestClient) -> MqttTestClient:
        code = await asyncio.to_thread(client.connect)
        assert not code.is_failure, f"{client.client_id}: CONNACK {code}"
        return client

    async def attacker_client(self, client_id: str = "") -> MqttTestClient:
        return await self.connected(
            self.client(self.attacker, self.attacker_password, client_id=client_id or self.attacker)
        )

    async def ingest_client(self) -> MqttTestClient:
        return await self.connected(
            self.client(self.mqtt.ingest_username, self.mqtt.ingest_password)
        )

    async def gateway_client(self) -> MqttTestClient:
        return await self.connected(
            self.client(self.mqtt.gateway_username, self.mqtt.gateway_password)
        )

    async def dispatcher_client(self) -> MqttTestClient:
        return await self.connected(
            self.client(
                self.env["CITYOPS_DISPATCHER_MQTT_USERNAME"],
                self.env["CITYOPS_DISPATCHER_MQTT_PASSWORD"],
            )
        )


@pytest_asyncio.fixture
async def edge(
    mqtt_settings: MqttSettings,
    stack_env: Mapping[str, str],
    provision_mqtt_device: ProvisionDevice,
) -> AsyncIterator[Edge]:
    tag = uuid.uuid4().hex[:8]
    attacker, victim = f"atk-{tag}", f"vic-{tag}"
    made = Edge(
        mqtt=mqtt_settings,
        env=stack_env,
        attacker=attacker,
        attacker_password=await provision_mqtt_device(attacker),
        victim=victim,
        victim_password=await provision_mqtt_device(victim),
        clients=[],
    )
    try:
        yield made
    finally:
        for client in made.clients:
            client.close()


async def _suback(client: MqttTestClient, topic: str) -> int:
    mid = client.subscribe(topic)
    codes = await wait_for(lambda: client.suback.get(mid), timeout=10, message=f"SUBACK {topic}")
    return int(codes[0].value)


async def _puback(
    client: MqttTestClient, topic: str, payload: bytes, *, retain: bool = False
) -> int:
    info = client.client.publish(topic, payload, qos=1, retain=retain)
    code = await wait_for(lambda: client.puback.get(info.mid), timeout=10, message="PUBACK")
    return int(code.value)


async def _attacker_gets_nothing(edge: Edge, attacker: MqttTestClient, victim_topic: str) -> None:
    """Publish on the victim's topic, then a marker to the attacker's own commands: once the
    marker is in, anything routed to the attacker before it would have arrived too."""
    gateway = await edge.gateway_client()
    own_commands = f"city/wastebin/{edge.attacker}/commands"
    assert await _suback(attacker, own_commands) == 1  # the one thing it may read
    assert await _puback(gateway, victim_topic, b'{"secret": 1}') < 0x80
    dispatcher = await edge.dispatcher_client()
    assert await _puback(dispatcher, own_commands, b"marker") < 0x80
    await wait_for(lambda: attacker.received(own_commands), timeout=10, message="marker")
    assert [m.topic for m in attacker.messages] == [own_commands]


@pytest.mark.parametrize(
    "topic",
    [
        "city/wastebin/{victim}/telemetry",
        "city/wastebin/{victim}/commands",
        "city/+/{victim}/#",
        "city/#",
        "#",
        "$SYS/#",
        "$share/{group}/city/+/+/telemetry",
    ],
    ids=[
        "victim-telemetry",
        "victim-commands",
        "victim-wildcard",
        "city-all",
        "all",
        "sys",
        "share",
    ],
)
async def test_a_device_cannot_subscribe_beyond_its_own_commands(edge: Edge, topic: str) -> None:
    attacker = await edge.attacker_client()
    filter_ = topic.format(victim=edge.victim, group=f"edge-{uuid.uuid4().hex[:6]}")
    assert await _suback(attacker, filter_) in REFUSED_SUBACK
    await _attacker_gets_nothing(edge, attacker, f"city/wastebin/{edge.victim}/telemetry")


async def test_mqtt311_device_is_refused_a_shared_subscription_too(edge: Edge) -> None:
    attacker = await edge.connected(
        edge.client(
            edge.attacker,
            edge.attacker_password,
            client_id=edge.attacker,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
    )
    assert await _suback(attacker, "$share/ingest/city/+/+/telemetry") == 0x80


async def test_a_share_group_keeps_every_message_when_a_device_tries_to_join(edge: Edge) -> None:
    """Row 5 of the issue: a device in ingest's round robin took ~50 % of every reading."""
    group = f"edge-{uuid.uuid4().hex[:6]}"
    victim_topic = f"city/wastebin/{edge.victim}/telemetry"
    member = await edge.ingest_client()
    assert await _suback(member, f"$share/{group}/city/+/{edge.victim}/telemetry") == 1
    attacker = await edge.attacker_client()
    assert (
        await _suback(attacker, f"$share/{group}/city/+/{edge.victim}/telemetry") in REFUSED_SUBACK
    )
    gateway = await edge.gateway_client()
    sent = 20
    for n in range(sent):
        assert await _puback(gateway, victim_topic, f'{{"n": {n}}}'.encode()) < 0x80
    await wait_for(
        lambda: len(member.received(victim_topic)) >= sent, timeout=10, message="all delivered"
    )
    assert [m.payload for m in member.received(victim_topic)] == [
        f'{{"n": {n}}}'.encode() for n in range(sent)
    ]
    assert attacker.messages == []


async def test_a_retained_publish_is_refused_and_never_replayed(edge: Edge) -> None:
    """Row 7: retained readings were replayed into Kafka at every ingest re-subscribe."""
    topic = f"city/wastebin/{edge.attacker}/telemetry"
    watcher = await edge.ingest_client()
    assert await _suback(watcher, topic) == 1
    attacker = await edge.attacker_client()
    assert await _puback(attacker, topic, b"retained", retain=True) == NOT_AUTHORIZED
    assert await _puback(attacker, topic, b"live") < 0x80  # the same topic, not retained
    await wait_for(lambda: watcher.received(topic), timeout=10, message="live reading")
    assert [m.payload for m in watcher.received(topic)] == [b"live"]
    # a later subscriber gets no retained copy: the next live reading is its first message
    late = await edge.ingest_client()
    assert await _suback(late, topic) == 1
    assert await _puback(attacker, topic, b"second") < 0x80
    await wait_for(lambda: late.received(topic), timeout=10, message="second reading")
    assert [(m.payload, m.retain) for m in late.received(topic)] == [(b"second", False)]


@pytest.mark.parametrize("owner", ["victim-device", "ingest-service"])
async def test_a_device_cannot_take_another_clients_id(edge: Edge, owner: str) -> None:
    """Row 6: the owner was kicked and the intruder got its session and queue."""
    if owner == "victim-device":
        holder = await edge.connected(
            edge.client(edge.victim, edge.victim_password, client_id=edge.victim)
        )
    else:
        holder = await edge.connected(
            edge.client(
                edge.mqtt.ingest_username,
                edge.mqtt.ingest_password,
                client_id=f"ingest-edge-{uuid.uuid4().hex[:6]}",
            )
        )
    intruder = edge.client(edge.attacker, edge.attacker_password, client_id=holder.client_id)
    code = await asyncio.to_thread(intruder.connect)
    assert code.is_failure, f"{edge.attacker} connected as {holder.client_id}"
    # the owner was not kicked: it still gets a SUBACK on its connection
    assert holder.client.is_connected()
    topic = (
        f"city/wastebin/{edge.victim}/telemetry"
        if owner == "ingest-service"
        else (f"city/wastebin/{edge.victim}/commands")
    )
    assert await _suback(holder, topic) == 1


async def test_a_dashed_client_id_owned_by_another_device_is_refused(
    edge: Edge, provision_mqtt_device: ProvisionDevice
) -> None:
    """`atk-x` may connect as `atk-x-spare`, never as device `atk-x-2` (or `atk-x-2-...`)."""
    longer = f"{edge.attacker}-2"
    await provision_mqtt_device(longer)
    spare = edge.client(edge.attacker, edge.attacker_password, client_id=f"{edge.attacker}-spare")
    assert not (await asyncio.to_thread(spare.connect)).is_failure
    for client_id in (longer, f"{longer}-z"):
        intruder = edge.client(edge.attacker, edge.attacker_password, client_id=client_id)
        assert (await asyncio.to_thread(intruder.connect)).is_failure, client_id


async def test_sessions_per_device_are_capped(edge: Edge) -> None:
    """Row 8: 300 sessions for one device were accepted."""
    cap = 3
    for n in range(cap):
        await edge.attacker_client(client_id=edge.attacker if n == 0 else f"{edge.attacker}-{n}")
    extra = edge.client(edge.attacker, edge.attacker_password, client_id=f"{edge.attacker}-x")
    assert (await asyncio.to_thread(extra.connect)).is_failure
    # a reconnect under a client id already connected takes that session over: not refused
    again = edge.client(edge.attacker, edge.attacker_password, client_id=f"{edge.attacker}-1")
    assert not (await asyncio.to_thread(again.connect)).is_failure


async def test_sockets_that_never_send_connect_are_closed(mqtt_settings: MqttSettings) -> None:
    """Row 8: 1,000 idle sockets were still open after 65 s; now closed within seconds."""
    sockets = [
        socket.create_connection((mqtt_settings.host, mqtt_settings.port), timeout=5)
        for _ in range(20)
    ]
    started = time.monotonic()
    try:

        def all_closed() -> bool:
            for sock in sockets:
                sock.settimeout(max(0.05, 20 - (time.monotonic() - started)))
                try:
                    if sock.recv(1) != b"":
                        return False
                except ConnectionResetError:
                    continue
                except TimeoutError:
                    return False
            return True

        assert await asyncio.to_thread(all_closed), "idle sockets still open after 20 s"
    finally:
        for sock in sockets:
            sock.close()
