"""Persistent sessions in a shared subscription, as Mosquitto (the stack's 2.0.x) treats them.

What these tests pin down (docs/ingest.md, "Scaling down"):
- a member of a share group that is offline but whose session exists keeps being given its
  round-robin share of the group's messages, queued in its session until it comes back;
- ending that session (a clean-session connect under its client id) drops what was queued for
  it: Mosquitto does not hand it to the other members. From then on the others get everything;
- `cityops ingest --purge-session` ends a session (3.1.1 or MQTT 5), and fails with exit code 1
  and the broker's reason when the broker refuses the ingest account, leaving the session alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping

import pytest
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cityops.common.mqtt_sessions import purge_session
from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MqttSettings
from tests.integration.ingest_support import CITYOPS, publish_all

pytestmark = [pytest.mark.mqtt]

PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}
# MQTT 5 sessions of these tests expire by themselves should a purge not happen (3.1.1 sessions
# cannot: the broker's persistent_client_expiration, 7 days, is all they have).
_TEST_SESSION_EXPIRY_S = 600
_QUEUED = 40  # messages published while one of two members is offline


class _Member:
    """An ingest-account client with a persistent session, as an ingest replica has."""

    def __init__(self, mqtt: MqttSettings, *, client_id: str, protocol: str) -> None:
        self.mqtt = mqtt
        self.client_id = client_id
        self.protocol = protocol
        self.session_present: bool | None = None
        self.connack: ReasonCode | None = None
        self._payloads: list[bytes] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client: Client | None = None

    def connect(self) -> None:
        """CONNECT without a clean session (resuming one if the broker has it); wait for CONNACK."""
        v5 = self.protocol == "5"
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PROTOCOLS[self.protocol],
            clean_session=None if v5 else False,
        )
        client.username_pw_set(self.mqtt.ingest_username, self.mqtt.ingest_password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self._subscribed.set()
        self._connected.clear()
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call] # paho leaves it untyped
            props.SessionExpiryInterval = _TEST_SESSION_EXPIRY_S
            client.connect(
                self.mqtt.host, self.mqtt.port, keepalive=10, clean_start=False, properties=props
            )
        else:
            client.connect(self.mqtt.host, self.mqtt.port, keepalive=10)
        self._client = client
        client.loop_start()
        assert self._connected.wait(10), f"{self.client_id}: no CONNACK"
        assert self.connack is not None
        assert not self.connack.is_failure, f"{self.client_id}: {self.connack}"

    def subscribe(self, topic: str) -> None:
        """SUBSCRIBE at QoS 1 and wait for the SUBACK (the membership exists from then on)."""
        assert self._client is not None
        self._subscribed.clear()
        self._client.subscribe(topic, qos=1)
        assert self._subscribed.wait(10), f"{self.client_id}: no SUBACK"

    def close(self) -> None:
        """DISCONNECT normally: the session stays at the broker."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def payloads(self) -> list[bytes]:
        """Payloads received so far, in order."""
        with self._lock:
            return list(self._payloads)

    def _on_connect(
        self, _c: Client, _u: object, flags: ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        self.connack = reason
        self.session_present = flags.session_present
        self._connected.set()

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        with self._lock:
            self._payloads.append(bytes(message.payload))


def _purge(mqtt: MqttSettings, client_id: str) -> bool:
    return purge_session(
        host=mqtt.host,
        port=mqtt.port,
        username=mqtt.ingest_username,
        password=mqtt.ingest_password,
        client_id=client_id,
    )


def _publish(mqtt: MqttSettings, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS 1 as the gateway; returns once every PUBACK is in (all routed)."""
    publisher = MqttTestClient(
        host=mqtt.host,
        port=mqtt.port,
        username=mqtt.gateway_username,
        password=mqtt.gateway_password,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    assert not publisher.connect().is_failure
    try:
        publish_all(publisher, ((topic, payload) for payload in payloads))
        assert len(publisher.puback) == len(payloads), "not every publish was acknowledged"
    finally:
        publisher.close()


@pytest.fixture
def members(mqtt_settings: MqttSettings) -> Iterator[list[_Member]]:
    """Closes and purges every member a test made (its sessions must not outlive it)."""
    made: list[_Member] = []
    yield made
    for member in made:
        member.close()
        assert _purge(mqtt_settings, member.client_id), f"could not purge {member.client_id}"


async def _group_with_one_away(
    mqtt: MqttSettings, members: list[_Member], protocol: str
) -> tuple[_Member, _Member, str, list[bytes]]:
    """Two members of a fresh share group; the second disconnects, then `_QUEUED` are published.

    Returns (online member, offline member, the plain topic, the payloads published).
    """
    tag = uuid.uuid4().hex[:10]
    topic = f"city/wastebin/wb-sess-{tag}/telemetry"  # nobody else publishes here
    shared = f"$share/sessions-{tag}/{topic}"
    online = _Member(mqtt, client_id=f"test-sess-a-{tag}", protocol=protocol)
    away = _Member(mqtt, client_id=f"test-sess-b-{tag}", protocol=protocol)
    members += [online, away]
    for member in (online, away):
        await asyncio.to_thread(member.connect)
        await asyncio.to_thread(member.subscribe, shared)
    assert away.session_present is False  # a fresh session, nothing left from an earlier run
    await asyncio.to_thread(away.close)
    payloads = [f"queued-{n}".encode() for n in range(_QUEUED)]
    # Mosquitto routes a PUBLISH before it sends the PUBACK: once this returns, every message
    # is either on its way to the online member or queued in the offline member's session.
    await asyncio.to_thread(_publish, mqtt, topic, payloads)
    return online, away, topic, payloads


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
async def test_an_offline_member_keeps_getting_its_share(
    mqtt_settings: MqttSettings, members: list[_Member], protocol: str
) -> None:
    online, away, _, payloads = await _group_with_one_away(mqtt_settings, members, protocol)
    await asyncio.to_thread(away.connect)  # same client id: the session is resumed
    assert away.session_present is True
    await wait_for(
        lambda: len(online.payloads()) + len(away.payloads()) >= _QUEUED,
        timeout=15,
        message="every published message delivered to one of the two members",
    )
    to_online, to_away = set(online.payloads()), set(away.payloads())
    assert to_online | to_away == set(payloads)
    assert not to_online & to_away
    # Strict round robin over the members whose sessions exist, connected or not: the offline
    # member's share waited in its session instead of going to the member that was there.
    assert len(to_away) == _QUEUED // 2, (len(to_online), len(to_away))


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
async def test_ending_an_offline_members_session_drops_its_share(
    mqtt_settings: MqttSettings, members: list[_Member], protocol: str
) -> None:
    online, away, topic, payloads = await _group_with_one_away(mqtt_settings, members, protocol)
    assert await asyncio.to_thread(_purge, mqtt_settings, away.client_id)
    after = [f"after-{n}".encode() for n in range(10)]
    await asyncio.to_thread(_publish, mqtt_settings, topic, after)
    # Everything published after the purge goes to the member left in the group. The broker
    # queues a client's messages in routing order, so anything it had handed over at the
    # purge would have arrived before these.
    await wait_for(
        lambda: set(after) <= set(online.payloads()),
        timeout=15,
        message="every message published after the purge delivered to the remaining member",
    )
    queued_to_online = set(online.payloads()) & set(payloads)
    assert len(queued_to_online) == _QUEUED // 2, "the purged member's share was re-dispatched"
    await asyncio.to_thread(away.connect)
    assert away.session_present is False  # its queue went with it


def _cityops_ingest(
    stack_env: Mapping[str, str], *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CITYOPS), "ingest", *args],
        env={**os.environ, **stack_env, "CITYOPS_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _session_with_a_queued_reading(
    mqtt: MqttSettings, members: list[_Member], protocol: str
) -> _Member:
    """A closed persistent session subscribed to a fresh topic, one reading queued for it."""
    tag = uuid.uuid4().hex[:10]
    topic = f"city/wastebin/wb-sess-{tag}/telemetry"
    member = _Member(mqtt, client_id=f"test-sess-cli-{tag}", protocol=protocol)
    members.append(member)
    await asyncio.to_thread(member.connect)
    await asyncio.to_thread(member.subscribe, f"$share/sessions-{tag}/{topic}")
    await asyncio.to_thread(member.close)
    await asyncio.to_thread(_publish, mqtt, topic, [b"queued"])
    return member


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
async def test_purge_session_command_ends_the_replicas_session(
    stack_env: Mapping[str, str],
    mqtt_settings: MqttSettings,
    members: list[_Member],
    protocol: str,
) -> None:
    replica = await _session_with_a_queued_reading(mqtt_settings, members, protocol)
    # As the replica itself would be configured: its client id from the environment.
    done = await asyncio.to_thread(
        _cityops_ingest, stack_env, "--purge-session", CITYOPS_INGEST_CLIENT_ID=replica.client_id
    )
    assert done.returncode == 0, done.stderr
    assert replica.client_id in done.stderr
    await asyncio.to_thread(replica.connect)
    assert replica.session_present is False


async def test_purge_session_command_fails_cleanly_when_the_broker_refuses(
    stack_env: Mapping[str, str], mqtt_settings: MqttSettings, members: list[_Member]
) -> None:
    replica = await _session_with_a_queued_reading(mqtt_settings, members, "3.1.1")
    done = await asyncio.to_thread(
        _cityops_ingest,
        stack_env,
        "--purge-session",
        "--client-id",
        replica.client_id,
        CITYOPS_INGEST_MQTT_PASSWORD="not-the-password",
    )
    assert done.returncode == 1, done.stderr
    assert "refused the connection: Not authorized" in done.stderr
    assert f"could not end the MQTT session of {replica.client_id}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "not-the-password" not in done.stderr
    await asyncio.to_thread(replica.connect)
    assert replica.session_present is True  # untouched, queued reading included
    await wait_for(lambda: replica.payloads() == [b"queued"], timeout=10, message="queued reading")


def test_client_id_only_with_purge_session(stack_env: Mapping[str, str]) -> None:
    done = _cityops_ingest(stack_env, "--client-id", "ingest-gone-3")
    assert done.returncode == 2
    assert "--client-id only goes with --purge-session" in done.stderr
