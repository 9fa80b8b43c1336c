"""Helpers for the ingest integration tests: an isolated ingest per test, publishers, readers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka.structs import ConsumerRecord
from paho.mqtt.enums import MQTTProtocolVersion

from cityops.api.outbox.relay import device_document
from cityops.common.kafka import KafkaAccess, kafka_consumer, kafka_producer
from cityops.common.kinds import Kind
from cityops.common.mqtt_sessions import purge_session as common_purge_session
from cityops.common.registry import Device, upsert_devices
from cityops.ingest.main import run
from cityops.ingest.settings import IngestSettings
from cityops.stack.mosquitto_instance import BrokerInstance, broker_tempdir
from cityops.stack.mosquitto_instance import free_port as free_port_in
from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MakeTopics, MqttSettings
from tests.integration.kafka_support import StackKafka

REPO = Path(__file__).resolve().parents[2]
CITYOPS = REPO / ".venv" / "bin" / "cityops"


def free_port() -> int:
    """A TCP port free right now on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class IngestCase:
    """One test's isolated world: its topics, database, share group and device ids."""

    tag: str
    env: dict[str, str]
    topics: dict[str, str]
    database_url: str
    kafka: StackKafka
    mqtt: MqttSettings
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    client_ids: set[str] = field(default_factory=set)

    @property
    def telemetry(self) -> str:
        return self.topics["city.telemetry.v1"]

    @property
    def status(self) -> str:
        return self.topics["city.status.v1"]

    @property
    def deadletter(self) -> str:
        return self.topics["city.deadletter.v1"]

    @property
    def devices(self) -> str:
        return self.topics["city.devices.v1"]

    def device(self, name: str) -> str:
        """A device id unique to this test."""
        return f"{name}-{self.tag}"

    def replica_env(self, index: int, **overrides: str) -> dict[str, str]:
        """Environment of ingest replica `index` (own client id and metrics port)."""
        client_id = f"ingest-test-{self.tag}-{index}"
        self.client_ids.add(client_id)
        return {
            **self.env,
            "CITYOPS_INGEST_CLIENT_ID": client_id,
            "CITYOPS_INSTANCE_ID": f"itest-{self.tag}-{index}",
            "CITYOPS_METRICS_PORT": str(free_port()),
            **overrides,
        }

    async def seed(self, devices: Mapping[str, Kind]) -> None:
        """Register devices in this test's database."""
        conn = await asyncpg.connect(self.database_url)
        try:
            await upsert_devices(
                conn, devices=[Device(device_id=d, kind=k) for d, k in devices.items()]
            )
        finally:
            await conn.close()

    async def publish_devices(self, device_ids: Iterable[str]) -> None:
        """Publish the current registry rows on the devices topic, as the API does after commit."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                """
                SELECT device_id, kind, district, zone, lat, lon, reporting_interval_s,
                       metadata::text AS metadata, enabled, updated_at
                FROM devices WHERE device_id = ANY($1::text[])
                """,
                list(device_ids),
            )
        finally:
            await conn.close()
        producer = kafka_producer(self.kafka.admin, acks="all")
        await producer.start()
        try:
            for row in rows:
                await producer.send_and_wait(
                    self.devices,
                    key=row["device_id"].encode(),
                    value=orjson.dumps(device_document(row)),
                )
        finally:
            await producer.stop()


async def make_case(
    *,
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt: MqttSettings,
    partitions: int = 3,
) -> IngestCase:
    tag = uuid.uuid4().hex[:8]
    topics = await kafka_topics(
        "city.telemetry.v1", "city.status.v1", "city.deadletter.v1", partitions=partitions
    )
    topics |= await kafka_topics(
        "city.devices.v1", partitions=partitions, configs={"cleanup.policy": "compact"}
    )
    kafka = StackKafka(stack_env)
    env = {
        **kafka.service("ingest").env(),
        "CITYOPS_MQTT_URL": stack_env["CITYOPS_MQTT_URL"],
        "CITYOPS_DATABASE_URL": database_url,
        "CITYOPS_INGEST_MQTT_USERNAME": stack_env["CITYOPS_INGEST_MQTT_USERNAME"],
        "CITYOPS_INGEST_MQTT_PASSWORD": stack_env["CITYOPS_INGEST_MQTT_PASSWORD"],
        "CITYOPS_INGEST_SHARE_GROUP": f"itest-{tag}",
        "CITYOPS_TOPIC_TELEMETRY": topics["city.telemetry.v1"],
        "CITYOPS_TOPIC_STATUS": topics["city.status.v1"],
        "CITYOPS_TOPIC_DEADLETTER": topics["city.deadletter.v1"],
        "CITYOPS_TOPIC_DEVICES": topics["city.devices.v1"],
        "CITYOPS_METRICS_HOST": "127.0.0.1",
        "CITYOPS_LOG_FORMAT": "json",
        "CITYOPS_INGEST_REGISTRY_REFRESH_S": "0.5",
    }
    return IngestCase(
        tag=tag,
        env=env,
        topics=topics,
        database_url=database_url,
        kafka=kafka,
        mqtt=mqtt,
    )


def settings_from(env: Mapping[str, str]) -> IngestSettings:
    """IngestSettings from an explicit mapping (the test's, not the process environment)."""
    prefix = "CITYOPS_"
    values: dict[str, Any] = {k[len(prefix) :].lower(): v for k, v in env.items()}
    return IngestSettings.model_validate(values)


def readyz(port: int) -> dict[str, Any] | None:
    """GET /readyz; the JSON body whatever the status, None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        failing: dict[str, Any] = json.loads(exc.read())
        return failing
    except OSError:
        return None


async def wait_ready(port: int, *, within_s: float = 30) -> None:
    """Until /readyz says ready (registry loaded, Kafka up, MQTT subscribed)."""

    async def ready() -> bool:
        body = await asyncio.to_thread(readyz, port)
        return bool(body and body["ready"])

    await wait_for(ready, timeout=within_s, interval=0.1, message=f"ingest on :{port} ready")


def metric_value(port: int, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of a metric's samples from /metrics (only those carrying `labels`, when given)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    wanted = [f'{key}="{value}"' for key, value in (labels or {}).items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            named = head == name or head.startswith(name + "{")
            if named and all(label in head for label in wanted):
                total += float(value)
    return total


@contextlib.asynccontextmanager
async def ingest_in_process(env: Mapping[str, str]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ingest as a task of this event loop; stop it gracefully on exit."""
    stop = asyncio.Event()
    settings = settings_from(env)
    task = asyncio.create_task(run(settings, stop=stop))
    try:
        await wait_ready(settings.metrics_port)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


def start_subprocess(case: IngestCase, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start `cityops ingest` as a child process (for kill -9 and SIGTERM tests)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full_env.update(env)
    log_path = Path(f"/tmp/cityops-ingest-test-{env['CITYOPS_INSTANCE_ID']}.log")
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(CITYOPS), "ingest"], env=full_env, stdout=log_file, stderr=log_file
        )
    case.processes.append(process)
    return process


def reading(device_id: str, kind: str, seq: int, ts: datetime, **fields: Any) -> bytes:
    """A valid reading payload."""
    by_kind: dict[str, dict[str, Any]] = {
        "streetlight": {"lamp_on": True},
        "manhole": {"cover_open": False},
        "wastebin": {"fill_pct": 40.0},
        "parking": {"occupied": seq % 2 == 0},
    }
    required = by_kind[kind]
    body = {
        "device_id": device_id,
        "kind": kind,
        "ts": ts.isoformat(),
        "seq": seq,
        **required,
        **fields,
    }
    return orjson.dumps(body)


def gateway(mqtt: MqttSettings) -> MqttTestClient:
    """A connected publisher on the gateway account (may publish for any device)."""
    client = MqttTestClient(
        host=mqtt.host,
        port=mqtt.port,
        username=mqtt.gateway_username,
        password=mqtt.gateway_password,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    reason = client.connect()
    assert not reason.is_failure, reason
    return client


def publish_all(client: MqttTestClient, messages: Iterable[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait for every PUBACK (bounded outstanding window)."""
    outstanding = []
    for topic, payload in messages:
        info = client.publish(topic, payload, qos=1)
        outstanding.append(info)
        if len(outstanding) >= 500:
            for pending in outstanding:
                pending.wait_for_publish(timeout=30)
            outstanding.clear()
    for pending in outstanding:
        pending.wait_for_publish(timeout=30)


def purge_session(mqtt: MqttSettings, client_id: str) -> None:
    """Remove a persistent session (cityops.common.mqtt_sessions.purge_session, best effort)."""
    common_purge_session(
        host=mqtt.host,
        port=mqtt.port,
        username=mqtt.ingest_username,
        password=mqtt.ingest_password,
        client_id=client_id,
    )


class TopicReader:
    """Reads a Kafka topic from the beginning; keeps every record seen."""

    def __init__(self, access: KafkaAccess, topic: str) -> None:
        self.consumer = kafka_consumer(access, topic, group_id=None, auto_offset_reset="earliest")
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    async def __aenter__(self) -> TopicReader:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self) -> None:
        batches = await self.consumer.getmany(timeout_ms=200, max_records=10_000)
        for records in batches.values():
            self.records.extend(records)

    async def until(
        self,
        predicate: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
        *,
        within_s: float,
        message: str,
    ) -> list[ConsumerRecord[bytes, bytes]]:
        async def check() -> bool:
            await self.poll()
            return predicate(self.records)

        await wait_for(check, timeout=within_s, interval=0.0, message=message)
        return self.records


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, bytes]:
    return dict(record.headers)


def seqs_of(records: Iterable[ConsumerRecord[bytes, bytes]], device_id: str) -> set[int]:
    seqs: set[int] = set()
    for record in records:
        if record.key == device_id.encode():
            seqs.add(orjson.loads(record.value)["seq"])
    return seqs


def past(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def stop_processes(case: IngestCase) -> None:
    for process in case.processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    for client_id in case.client_ids:
        purge_session(case.mqtt, client_id)


@contextlib.asynccontextmanager
async def ingest_case(
    *,
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt: MqttSettings,
) -> AsyncIterator[IngestCase]:
    """A case for one test; afterwards its processes are killed and its sessions purged."""
    made = await make_case(
        stack_env=stack_env, kafka_topics=kafka_topics, database_url=database_url, mqtt=mqtt
    )
    try:
        yield made
    finally:
        await asyncio.to_thread(stop_processes, made)


# The Debian package's broker (2.0.11): it replays retained messages to shared subscriptions
# with RETAIN set (issue 11, row 7), so the tests of ingest's edge run against it, anonymous
# (what is tested is ingest, not the broker's authorisation).
DEBIAN_MOSQUITTO = "/usr/sbin/mosquitto"
OWN_BROKER_PORTS = range(19900, 19950)  # ingest's range on the shared test machine


def _anonymous_conf(home: Path, port: int) -> str:
    return (
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {home}/data/\n"
        "max_inflight_messages 1000\n"
        "max_packet_size 262144\n"
    )


@contextlib.asynccontextmanager
async def own_broker() -> AsyncIterator[BrokerInstance]:
    """A started broker of the test's own on a port of ingest's range; removed afterwards."""
    with broker_tempdir("cityops-ingest-broker-") as home:
        port = free_port_in(OWN_BROKER_PORTS)
        broker = BrokerInstance.create(
            home,
            port=port,
            accounts={},
            binary=DEBIAN_MOSQUITTO,
            conf_text=_anonymous_conf(home, port),
        )
        await asyncio.to_thread(broker.start)
        try:
            yield broker
        finally:
            await asyncio.to_thread(broker.close)


def broker_url(broker: BrokerInstance) -> str:
    return f"mqtt://127.0.0.1:{broker.port}"


def anonymous_publisher(broker: BrokerInstance) -> MqttTestClient:
    """A connected MQTT 3.1.1 client on a broker of the test's own."""
    client = MqttTestClient(
        host="127.0.0.1",
        port=broker.port,
        username=None,
        password=None,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    assert not client.connect().is_failure
    return client
