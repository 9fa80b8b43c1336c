"""The native stack: each server answers, and behaves the way the services rely on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Mapping

import asyncpg
import pytest
from aiokafka import TopicPartition
from paho.mqtt.enums import MQTTProtocolVersion

from cityops.common.kafka import kafka_consumer, kafka_producer
from cityops.stack.layout import StackPaths, repo_root
from cityops.stack.probes import mqtt_connect_reason
from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MakeTopics, MqttSettings, ProvisionDevice, edit_devices
from tests.integration.kafka_support import StackKafka

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


@pytest.mark.kafka
async def test_kafka_idempotent_produce_then_group_consume_and_commit(
    kafka: StackKafka, kafka_topics: MakeTopics
) -> None:
    topic = (await kafka_topics("stack.roundtrip", partitions=3))["stack.roundtrip"]
    sent = {f"reading-{n}".encode() for n in range(60)}
    producer = kafka_producer(kafka.admin, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        deliveries = [
            await producer.send(topic, key=f"dev-{n % 7}".encode(), value=value)
            for n, value in enumerate(sorted(sent))
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()

    group = f"test-stack-{uuid.uuid4().hex[:8]}"
    consumer = kafka_consumer(
        kafka.admin,
        topic,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received: list[bytes] = []

        async def got_everything() -> bool:
            batches = await consumer.getmany(timeout_ms=200)
            received.extend(m.value for messages in batches.values() for m in messages)
            return len(received) >= len(sent)

        await wait_for(got_everything, timeout=30, message="all produced records consumed")
        assert set(received) == sent and len(received) == len(sent)  # no duplicates either
        await consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(3)]
        committed = {tp.partition: await consumer.committed(tp) for tp in partitions}
        positions = {tp.partition: await consumer.position(tp) for tp in partitions}
    finally:
        await consumer.stop()
    assert committed == positions
    assert sum(offset or 0 for offset in committed.values()) == len(sent)


def _mqtt(settings: MqttSettings, username: str | None, password: str | None) -> MqttTestClient:
    return MqttTestClient(settings.host, settings.port, username, password)


@pytest.mark.mqtt
async def test_device_publishes_own_topic_and_ingest_receives_it_via_shared_subscription(
    mqtt_settings: MqttSettings, provision_mqtt_device: ProvisionDevice
) -> None:
    device_id = f"wb-{uuid.uuid4().hex[:10]}"
    password = await provision_mqtt_device(device_id)
    topic = f"city/wastebin/{device_id}/telemetry"
    ingest = _mqtt(mqtt_settings, mqtt_settings.ingest_username, mqtt_settings.ingest_password)
    device = _mqtt(mqtt_settings, device_id, password)
    try:
        assert not (await asyncio.to_thread(ingest.connect)).is_failure
        mid = ingest.subscribe(f"$share/test-{uuid.uuid4().hex[:6]}/city/+/{device_id}/telemetry")
        suback = await wait_for(lambda: ingest.suback.get(mid), timeout=5, message="SUBACK")
        assert [code.value for code in suback] == [1]  # granted QoS 1: the ACL lets ingest read

        assert not (await asyncio.to_thread(device.connect)).is_failure
        info = device.publish(topic, b'{"fill_pct": 87.5}')
        puback = await wait_for(lambda: device.puback.get(info.mid), timeout=5, message="PUBACK")
        assert not puback.is_failure
        messages = await wait_for(lambda: ingest.received(topic), timeout=5, message="delivery")
        assert messages[0].payload == b'{"fill_pct": 87.5}'
    finally:
        device.close()
        ingest.close()


@pytest.mark.mqtt
async def test_device_cannot_publish_for_another_device(
    mqtt_settings: MqttSettings, provision_mqtt_device: ProvisionDevice
) -> None:
    device_id = f"wb-{uuid.uuid4().hex[:10]}"
    other_id = f"wb-{uuid.uuid4().hex[:10]}"
    password = await provision_mqtt_device(device_id)
    own_topic = f"city/wastebin/{device_id}/telemetry"
    foreign_topic = f"city/wastebin/{other_id}/telemetry"
    ingest = _mqtt(mqtt_settings, mqtt_settings.ingest_username, mqtt_settings.ingest_password)
    device = _mqtt(mqtt_settings, device_id, password)
    try:
        await asyncio.to_thread(ingest.connect)
        mid = ingest.subscribe("city/wastebin/#")
        await wait_for(lambda: ingest.suback.get(mid), timeout=5, message="SUBACK")
        await asyncio.to_thread(device.connect)

        denied = device.publish(foreign_topic, b"spoofed")
        code = await wait_for(lambda: device.puback.get(denied.mid), timeout=5, message="PUBACK")
        assert code.value == NOT_AUTHORIZED

        # messages from one connection arrive in order: once the allowed one is in, the
        # denied one would have been delivered before it
        device.publish(own_topic, b"genuine")
        await wait_for(lambda: ingest.received(own_topic), timeout=5, message="own-topic delivery")
        assert ingest.received(foreign_topic) == []
    finally:
        device.close()
        ingest.close()


@pytest.mark.mqtt
async def test_mqtt311_device_publish_is_delivered(
    mqtt_settings: MqttSettings, provision_mqtt_device: ProvisionDevice
) -> None:
    device_id = f"pk-{uuid.uuid4().hex[:10]}"
    password = await provision_mqtt_device(device_id)
    topic = f"city/parking/{device_id}/status"
    ingest = _mqtt(mqtt_settings, mqtt_settings.ingest_username, mqtt_settings.ingest_password)
    device = MqttTestClient(
        mqtt_settings.host,
        mqtt_settings.port,
        device_id,
        password,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    try:
        await asyncio.to_thread(ingest.connect)
        mid = ingest.subscribe("$share/ingest-test/city/+/+/status")
        await wait_for(lambda: ingest.suback.get(mid), timeout=5, message="SUBACK")
        assert not (await asyncio.to_thread(device.connect)).is_failure
        device.publish(topic, b'{"online": true}')
        await wait_for(lambda: ingest.received(topic), timeout=5, message="delivery")
    finally:
        device.close()
        ingest.close()


@pytest.mark.mqtt
async def test_wrong_password_and_anonymous_are_refused(
    mqtt_settings: MqttSettings, provision_mqtt_device: ProvisionDevice
) -> None:
    device_id = f"ml-{uuid.uuid4().hex[:10]}"
    await provision_mqtt_device(device_id)
    for username, password in [(device_id, "wrong"), (None, None), ("nobody", "x")]:
        client = _mqtt(mqtt_settings, username, password)
        try:
            code = await asyncio.to_thread(client.connect)
        finally:
            client.close()
        assert code.value in {NOT_AUTHORIZED, BAD_CREDENTIALS}, (username, code)


@pytest.mark.mqtt
async def test_revoked_device_can_no_longer_connect(
    mqtt_settings: MqttSettings, provision_mqtt_device: ProvisionDevice
) -> None:
    device_id = f"sl-{uuid.uuid4().hex[:10]}"
    password = await provision_mqtt_device(device_id)
    assert f"{device_id}:$7$101$" in mqtt_settings.device_password_file.read_text()

    # the same path the factory's teardown takes: remove the line (the plugin follows it)
    await asyncio.to_thread(edit_devices, mqtt_settings, add={}, remove={device_id})

    async def refused() -> bool:
        reason = await asyncio.to_thread(
            mqtt_connect_reason,
            mqtt_settings.host,
            mqtt_settings.port,
            username=device_id,
            password=password,
        )
        return reason is not None and reason.startswith("CONNACK")

    await wait_for(refused, timeout=10, interval=0.1, message="revoked device refused")


@pytest.mark.postgres
async def test_postgres_round_trip_in_fresh_migrated_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("t_")
        applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert applied >= 1
        await conn.execute("CREATE TEMP TABLE probe (id int PRIMARY KEY, note text)")
        await conn.execute("INSERT INTO probe VALUES ($1, $2)", 1, "hello")
        assert await conn.fetchval("SELECT note FROM probe WHERE id = $1", 1) == "hello"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        body: dict[str, object] = json.load(response)
        return body


@pytest.mark.prometheus
async def test_prometheus_ready_with_our_scrape_jobs(stack_env: Mapping[str, str]) -> None:
    base = stack_env["CITYOPS_PROMETHEUS_URL"]
    ready = await asyncio.to_thread(urllib.request.urlopen, f"{base}/-/ready", timeout=5)
    with ready:
        assert ready.status == 200
    targets = await asyncio.to_thread(_get_json, f"{base}/api/v1/targets")
    data = targets["data"]
    assert isinstance(data, dict)
    jobs = {target["scrapePool"]: target["scrapeUrl"] for target in data["activeTargets"]}
    assert jobs == {
        "prometheus": "http://127.0.0.1:9090/metrics",
        "cityops-ingest": "http://127.0.0.1:9101/metrics",
        "cityops-rules": "http://127.0.0.1:9102/metrics",
        "cityops-api": "http://127.0.0.1:8000/metrics",
    }
    config = await asyncio.to_thread(_get_json, f"{base}/api/v1/status/config")
    assert "scrape_interval: 5s" in str(config)


def test_stack_status_lists_all_four_servers() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cityops.cli", "stack", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["postgres", "mosquitto", "kafka", "prometheus"]
    assert all("running (pid" in line and "answers" in line for line in lines)


@pytest.mark.prometheus
def test_promtool_accepts_the_rendered_config_and_every_rule_file() -> None:
    rendered = StackPaths(repo=repo_root()).root / "prometheus" / "prometheus.yml"
    completed = subprocess.run(
        ["promtool", "check", "config", str(rendered)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
