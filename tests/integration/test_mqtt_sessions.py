"""purge_session removes a persistent session and the messages queued for it."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from cityops.common.mqtt_sessions import purge_session
from tests.integration.conftest import MqttSettings

pytestmark = [pytest.mark.mqtt]


class _Subscriber:
    """An ingest-account client with a persistent session (MQTT 3.1.1, clean_session off)."""

    def __init__(self, mqtt: MqttSettings, client_id: str) -> None:
        self.session_present: bool | None = None
        self.received: list[bytes] = []
        self.connected = threading.Event()
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.client.username_pw_set(mqtt.ingest_username, mqtt.ingest_password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(mqtt.host, mqtt.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(5), "subscriber did not connect"

    def _on_connect(
        self, _c: Client, _u: object, flags: ConnectFlags, _r: ReasonCode, _p: object
    ) -> None:
        self.session_present = flags.session_present
        self.connected.set()

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        self.received.append(bytes(message.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(mqtt: MqttSettings, topic: str, payload: bytes) -> None:
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.username_pw_set(mqtt.gateway_username, mqtt.gateway_password)
    client.connect(mqtt.host, mqtt.port, keepalive=10)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def _queued_then_reconnect(mqtt: MqttSettings, *, purge: bool) -> _Subscriber:
    client_id = f"test-purge-{uuid.uuid4().hex[:8]}"
    topic = f"city/wastebin/wb-{uuid.uuid4().hex[:8]}/telemetry"
    first = _Subscriber(mqtt, client_id)
    first.client.subscribe(topic, qos=1)
    _publish(mqtt, topic, b"live")  # the subscription is in place once this comes back
    for _ in range(50):
        if first.received:
            break
        time.sleep(0.1)
    first.close()
    _publish(mqtt, topic, b"queued while away")
    if purge:
        assert purge_session(
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.ingest_username,
            password=mqtt.ingest_password,
            client_id=client_id,
        )
    again = _Subscriber(mqtt, client_id)
    time.sleep(0.5)  # a queued message is delivered right after CONNACK
    again.close()
    if not purge:
        purge_session(
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.ingest_username,
            password=mqtt.ingest_password,
            client_id=client_id,
        )
    return again


async def test_purged_session_is_gone_with_its_queue(mqtt_settings: MqttSettings) -> None:
    kept = await asyncio.to_thread(_queued_then_reconnect, mqtt_settings, purge=False)
    assert kept.session_present is True
    assert kept.received == [b"queued while away"]
    purged = await asyncio.to_thread(_queued_then_reconnect, mqtt_settings, purge=True)
    assert purged.session_present is False
    assert purged.received == []


async def test_purge_with_bad_credentials_reports_failure(mqtt_settings: MqttSettings) -> None:
    ok = await asyncio.to_thread(
        lambda: purge_session(
            host=mqtt_settings.host,
            port=mqtt_settings.port,
            username=mqtt_settings.ingest_username,
            password="not-the-password",
            client_id=f"test-purge-{uuid.uuid4().hex[:8]}",
            timeout_s=2.0,
        )
    )
    assert ok is False
