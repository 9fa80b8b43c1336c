"""The edge fault harness: our own broker, ingest pointed at it, 50 devices publishing QoS 1.

A case (`edge_case`) starts a Mosquitto of its own (the stack's binary and rendered config on a
port in 19800-19899 and a data dir of its own: never the shared broker on 1883), one
`cityops ingest` subprocess pointed at it and at the shared Kafka with uuid-named topics, and a
`Fleet` of devices, each with its own credentials, that records every PUBACKed (device, seq).
`EdgeCase.outcome()` is the check: which acknowledged readings are not in the telemetry topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from aiokafka.structs import ConsumerRecord
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cityops.common.kinds import Kind
from cityops.stack.mosquitto_instance import BrokerInstance, broker_tempdir, free_port
from tests.helpers import wait_for
from tests.integration.conftest import MakeTopics, MqttSettings
from tests.integration.ingest_support import (
    IngestCase,
    TopicReader,
    ingest_case,
    metric_value,
    reading,
    start_subprocess,
    wait_ready,
)

PORTS = range(19800, 19850)  # the bench uses 19850-19899
DEVICES = 50
RATE_PER_S = 300  # all devices together: 6 readings/s each
KIND = Kind.PARKING
# These cases are about loss, not rate limiting.
FAST = {"CITYOPS_INGEST_RATE_PER_S": "100000", "CITYOPS_INGEST_RATE_BURST": "100000"}


class Device:
    """One device: its own credentials and client id, paho's network thread, auto-reconnect."""

    def __init__(self, *, device_id: str, password: str, port: int) -> None:
        self.device_id = device_id
        self.topic = f"city/{KIND.value}/{device_id}/telemetry"
        self.sent: list[tuple[int, MQTTMessageInfo]] = []
        self.disconnects = 0
        self._acked_mids: set[int] = set()  # mids stay unique: far fewer than 65,535 a case
        self._client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self._client.username_pw_set(device_id, password)
        # a device retries fast; paho resends unacknowledged QoS 1 after a reconnect
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=1)  # type: ignore[arg-type] # paho waits float seconds fine; its hint says int
        self._client.max_queued_messages_set(0)
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.connect_async("127.0.0.1", port, keepalive=10)
        self._client.loop_start()

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: object,
        _flags: DisconnectFlags,
        _reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.disconnects += 1

    def _on_publish(
        self,
        _client: Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            self._acked_mids.add(mid)

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def publish(self, seq: int) -> None:
        """QoS 1; paho queues it while disconnected and sends it after the reconnect."""
        payload = reading(self.device_id, KIND.value, seq, datetime.now(UTC))
        self.sent.append((seq, self._client.publish(self.topic, payload, qos=1)))

    def acked(self) -> set[int]:
        """Seqs the broker PUBACKed."""
        return {seq for seq, info in self.sent if info.mid in self._acked_mids}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def connack_of(*, device_id: str, password: str, port: int) -> ReasonCode | None:
    """One MQTT 3.1.1 CONNECT with the device's own id: its CONNACK, None if closed without one."""
    answered = threading.Event()
    outcome: list[ReasonCode] = []
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=device_id,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.username_pw_set(device_id, password)

    def on_connect(
        _c: Client, _u: object, _f: ConnectFlags, reason: ReasonCode, _p: Properties | None
    ) -> None:
        outcome.append(reason)
        answered.set()

    def on_disconnect(
        _c: Client, _u: object, _f: DisconnectFlags, _r: ReasonCode, _p: Properties | None
    ) -> None:
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0] if outcome else None


class Fleet:
    """`count` devices publishing round-robin at `rate_per_s` in total, from one pacing thread."""

    def __init__(self, credentials: Mapping[str, str], *, port: int, rate_per_s: int) -> None:
        self.devices = [
            Device(device_id=device_id, password=password, port=port)
            for device_id, password in credentials.items()
        ]
        self.rate_per_s = rate_per_s
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pace, name="fleet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pace(self) -> None:
        tick_s = 0.05
        per_tick = max(1, round(self.rate_per_s * tick_s))
        seq = 0
        while not self._stop.wait(tick_s):
            for _ in range(per_tick):
                device = self.devices[self.published % len(self.devices)]
                device.publish(seq)
                self.published += 1
                if self.published % len(self.devices) == 0:
                    seq += 1

    def stop_publishing(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def acked(self) -> set[tuple[str, int]]:
        return {(device.device_id, seq) for device in self.devices for seq in device.acked()}

    def unacked(self) -> int:
        return sum(len(d.sent) for d in self.devices) - len(self.acked())

    def close(self) -> None:
        for device in self.devices:
            device.close()


class Attacker:
    """A device's own valid credentials used against the edge, again and again, from a thread.

    `client_id` None: connect as itself and subscribe `subscribe` (e.g. ingest's share group);
    otherwise connect with someone else's client id (persistent session: it would get theirs).
    Records each CONNACK, each SUBACK and every message the broker routed to it.
    """

    def __init__(
        self,
        *,
        username: str,
        password: str,
        port: int,
        client_id: str | None = None,
        subscribe: str | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.port = port
        self.client_id = client_id or username
        self.subscribe_to = subscribe
        self.accepted = 0
        self.refused = 0
        self.granted: list[int] = []
        self.denied: list[int] = []
        self.received: list[MQTTMessage] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"attacker-{username}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._attempt()
            self._stop.wait(0.5)

    def _attempt(self) -> None:
        answered = threading.Event()
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        client.username_pw_set(self.username, self.password)

        def on_connect(
            _c: Client, _u: object, _f: ConnectFlags, reason: ReasonCode, _p: Properties | None
        ) -> None:
            with self._lock:
                if reason.is_failure:
                    self.refused += 1
                else:
                    self.accepted += 1
                    if self.subscribe_to is not None:
                        client.subscribe(self.subscribe_to, qos=1)
            answered.set()

        def on_subscribe(
            _c: Client, _u: object, _m: int, reasons: list[ReasonCode], _p: Properties | None
        ) -> None:
            with self._lock:
                for reason in reasons:
                    (self.denied if reason.is_failure else self.granted).append(reason.value)

        def on_message(_c: Client, _u: object, message: MQTTMessage) -> None:
            with self._lock:
                self.received.append(message)

        def on_disconnect(
            _c: Client, _u: object, _f: DisconnectFlags, _r: ReasonCode, _p: Properties | None
        ) -> None:
            answered.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        try:
            client.connect("127.0.0.1", self.port, keepalive=10)
        except OSError:
            with self._lock:
                self.refused += 1
            return
        client.loop_start()
        try:
            answered.wait(5)
            # a subscriber stays to take its share; an id thief holds the id a moment
            self._stop.wait(5.0 if self.subscribe_to else 1.0)
        finally:
            client.disconnect()
            client.loop_stop()


@dataclass(frozen=True, repr=False)
class Outcome:
    """Acknowledged readings vs what reached the telemetry topic."""

    published: int
    acked: int
    found: int
    missing: frozenset[tuple[str, int]]

    def __str__(self) -> str:
        return (
            f"published {self.published}, acked {self.acked}, acked and in Kafka {self.found}, "
            f"acked but missing {len(self.missing)} (e.g. {sorted(self.missing)[:3]})"
        )

    __repr__ = __str__


@dataclass
class EdgeCase:
    """One fault case: broker, ingest (restartable), fleet credentials, topics."""

    broker: BrokerInstance
    ingest: IngestCase
    ingest_env: dict[str, str]
    devices: dict[str, str]
    spare: dict[str, str]
    ingest_process: subprocess.Popen[bytes] | None = None
    fleet: Fleet | None = None
    attackers: list[Attacker] = field(default_factory=list)

    @property
    def ingest_client_id(self) -> str:
        return self.ingest_env["CITYOPS_INGEST_CLIENT_ID"]

    @property
    def metrics_port(self) -> int:
        return int(self.ingest_env["CITYOPS_METRICS_PORT"])

    async def start_ingest(self) -> None:
        """Start `cityops ingest` (same client id and share group every time) and wait ready."""
        self.ingest_process = start_subprocess(self.ingest, self.ingest_env)
        await wait_ready(self.metrics_port, within_s=30)

    def stop_ingest(self) -> None:
        """SIGTERM: ingest drains and acks what Kafka took, then disconnects."""
        assert self.ingest_process is not None
        self.ingest_process.terminate()
        self.ingest_process.wait(timeout=30)

    def kill_ingest(self) -> None:
        assert self.ingest_process is not None
        self.ingest_process.kill()
        self.ingest_process.wait(timeout=10)

    def ingest_reconnects(self) -> float:
        return metric_value(self.metrics_port, "cityops_ingest_mqtt_reconnects_total")

    async def start_fleet(self) -> Fleet:
        """Connect every device, then start publishing."""
        fleet = Fleet(self.devices, port=self.broker.port, rate_per_s=RATE_PER_S)
        self.fleet = fleet
        await wait_for(
            lambda: all(d.connected for d in fleet.devices),
            timeout=20,
            interval=0.05,
            message=f"{len(fleet.devices)} devices connected",
        )
        fleet.start()
        return fleet

    async def publish_until(self, count: int) -> None:
        """Wait until the fleet has published `count` readings in total (sent or queued)."""
        fleet = self.fleet
        assert fleet is not None
        await wait_for(
            lambda: fleet.published >= count,
            timeout=count / RATE_PER_S * 3 + 10,
            interval=0.05,
            message=f"{count} readings published",
        )

    async def outcome(self, *, settle_s: float = 10.0, within_s: float = 45.0) -> Outcome:
        """Stop publishing, wait for the last PUBACKs, then look for every acked one in Kafka."""
        fleet = self.fleet
        assert fleet is not None
        fleet.stop_publishing()
        with contextlib.suppress(AssertionError):  # what is never acked is simply not counted
            await wait_for(
                lambda: fleet.unacked() == 0,
                timeout=settle_s,
                interval=0.1,
                message="last PUBACKs",
            )
        acked = fleet.acked()
        found: set[tuple[str, int]] = set()
        seen = 0

        def all_found(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
            nonlocal seen
            for record in records[seen:]:
                value = orjson.loads(record.value)
                found.add((value["device_id"], value["seq"]))
            seen = len(records)
            return acked <= found

        async with TopicReader(self.ingest.kafka.admin, self.ingest.telemetry) as reader:
            with contextlib.suppress(AssertionError):  # a loss is reported below, not raised
                await reader.until(
                    all_found, within_s=within_s, message="every acked reading in Kafka"
                )
        return Outcome(
            published=fleet.published,
            acked=len(acked),
            found=len(acked & found),
            missing=frozenset(acked - found),
        )

    def close(self) -> None:
        for attacker in self.attackers:
            attacker.stop()
        if self.fleet is not None:
            self.fleet.close()


@contextlib.asynccontextmanager
async def edge_case(
    *,
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt: MqttSettings,
    spare_devices: int = 0,
) -> AsyncIterator[EdgeCase]:
    """Broker, ingest and 50 (+ `spare_devices`) registered devices with credentials."""
    tag = uuid.uuid4().hex[:8]
    devices = {f"edge-{tag}-{i:02d}": secrets.token_urlsafe(12) for i in range(DEVICES)}
    spare = {f"edge-{tag}-x{i}": secrets.token_urlsafe(12) for i in range(spare_devices)}
    services = {
        mqtt.ingest_username: mqtt.ingest_password,
        mqtt.gateway_username: mqtt.gateway_password,
    }
    with broker_tempdir("cityops-edge-") as tmp:
        port = free_port(PORTS)
        broker = await asyncio.to_thread(
            BrokerInstance.create,
            tmp / "mosquitto",
            port=port,
            accounts={**services, **devices, **spare},
        )
        await asyncio.to_thread(broker.start)
        own_mqtt = dataclasses.replace(mqtt, port=port)
        try:
            async with ingest_case(
                stack_env=stack_env,
                kafka_topics=kafka_topics,
                database_url=database_url,
                mqtt=own_mqtt,
            ) as ingest:
                await ingest.seed(dict.fromkeys([*devices, *spare], KIND))
                env = ingest.replica_env(
                    0,
                    CITYOPS_MQTT_URL=f"mqtt://127.0.0.1:{port}",
                    CITYOPS_INGEST_SHARE_GROUP="ingest",
                    **FAST,
                )
                made = EdgeCase(
                    broker=broker, ingest=ingest, ingest_env=env, devices=devices, spare=spare
                )
                try:
                    await made.start_ingest()
                    yield made
                finally:
                    await asyncio.to_thread(made.close)
        finally:
            broker.close()
