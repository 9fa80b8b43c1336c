"""The simulator against the real stack: provisioning into a fresh database, publishing through
Mosquitto with the gateway account or one connection per device, a subscriber receiving it."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import asyncpg
import pytest

from cityops.common.events import parse_reading
from cityops.common.kinds import RejectReason
from cityops.simulator.city import PLACES
from cityops.simulator.main import RunOptions, run
from cityops.simulator.publisher import MqttConnectError, MqttPublisher, PublishStats
from cityops.simulator.settings import SimulatorSettings
from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MqttSettings, edit_devices

pytestmark = [pytest.mark.mqtt, pytest.mark.postgres]


def settings_for(mqtt: MqttSettings, database_url: str) -> SimulatorSettings:
    return SimulatorSettings(
        mqtt_url=f"mqtt://{mqtt.host}:{mqtt.port}",
        simulator_mqtt_username=mqtt.gateway_username,
        simulator_mqtt_password=mqtt.gateway_password,
        database_url=database_url,
        mqtt_device_password_file=mqtt.device_password_file,
        mqtt_password_lock_file=mqtt.lock_file,
        shutdown_timeout_s=5.0,
    )


async def wait_subscribed(client: MqttTestClient, mid: int) -> None:
    await wait_for(lambda: mid in client.suback, timeout=5, message="SUBACK")


async def test_gateway_provisions_the_fleet_and_publishes_valid_readings(
    mqtt_settings: MqttSettings, database_url: str
) -> None:
    prefix = f"it{uuid.uuid4().hex[:6]}-"
    listener = MqttTestClient(
        mqtt_settings.host,
        mqtt_settings.port,
        mqtt_settings.ingest_username,
        mqtt_settings.ingest_password,
    )
    assert not listener.connect().is_failure
    await wait_subscribed(listener, listener.subscribe("city/+/+/+", qos=1))
    try:
        options = RunOptions(
            devices_per_kind=5,
            districts=4,
            place=PLACES["barcelona"],
            rate=100.0,
            duration_s=2.0,
            id_prefix=prefix,
            settle_s=0.0,
            radio_effects=False,
            client_id_prefix=f"it-sim-{uuid.uuid4().hex[:6]}",
        )
        summary = await run(
            settings_for(mqtt_settings, database_url), options, stop=asyncio.Event()
        )
        assert summary.drained
        assert summary.stats.errors == 0
        assert summary.stats.acked == summary.stats.sent >= 150

        def mine() -> list[tuple[str, bytes]]:
            with listener._lock:
                return [
                    (m.topic, bytes(m.payload))
                    for m in listener.messages
                    if m.topic.split("/")[2].startswith(prefix)
                ]

        await wait_for(
            lambda: len(mine()) >= summary.stats.sent, timeout=10, message="all messages received"
        )
        seqs: dict[str, list[int]] = defaultdict(list)
        for topic, payload in mine():
            assert topic.endswith("/telemetry")
            reading = parse_reading(payload)
            assert topic == f"city/{reading.kind}/{reading.device_id}/telemetry"
            seqs[reading.device_id].append(reading.seq)
        assert len(seqs) == 20  # every device reported
        for values in seqs.values():
            assert values == list(range(1, len(values) + 1))  # per-device order, no gaps
    finally:
        listener.close()

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT kind, count(*) AS n FROM devices WHERE device_id LIKE $1 GROUP BY kind",
            prefix + "%",
        )
        assert {row["kind"]: row["n"] for row in rows} == {
            "streetlight": 5,
            "manhole": 5,
            "wastebin": 5,
            "parking": 5,
        }
        districts = await conn.fetchval("SELECT count(*) FROM districts")
        assert districts == 4
        located = await conn.fetchval(
            "SELECT count(*) FROM devices WHERE device_id LIKE $1 AND lat BETWEEN 41.3 AND 41.5",
            prefix + "%",
        )
        assert located == 20
    finally:
        await conn.close()


async def test_provisioning_twice_updates_in_place(database_url: str) -> None:
    from cityops.simulator.city import build_city
    from cityops.simulator.provision import provision_direct

    city = build_city(place=PLACES["oslo"], devices_per_kind=50, district_count=3, id_prefix="p-")
    first = await provision_direct(database_url=database_url, city=city)
    second = await provision_direct(database_url=database_url, city=city)
    assert first.written == second.written == 200
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM devices") == 200
    finally:
        await conn.close()


async def test_one_connection_per_device_with_its_own_credentials(
    mqtt_settings: MqttSettings, database_url: str
) -> None:
    prefix = f"dv{uuid.uuid4().hex[:6]}-"
    listener = MqttTestClient(
        mqtt_settings.host,
        mqtt_settings.port,
        mqtt_settings.ingest_username,
        mqtt_settings.ingest_password,
    )
    assert not listener.connect().is_failure
    await wait_subscribed(listener, listener.subscribe("city/+/+/+", qos=1))
    options = RunOptions(
        devices_per_kind=2,
        districts=2,
        rate=40.0,
        duration_s=2.5,
        mode="device",
        id_prefix=prefix,
        settle_s=1.5,
        radio_effects=True,  # the seeded silent manhole needs them (so do a few dropouts)
        incidents=True,  # among them: a manhole that goes silent from the start
        # a device publishing on another device's topic: the broker's ACL refuses it
        faults=(RejectReason.ID_MISMATCH,),
        first_fault_s=0.5,
        fault_interval_s=5.0,
    )
    device_ids = {f"{prefix}{k}-{n:06d}" for k in ("sl", "mh", "wb", "pk") for n in (1, 2)}
    try:
        summary = await run(
            settings_for(mqtt_settings, database_url), options, stop=asyncio.Event()
        )
        assert summary.stats.refused == 1  # the id_mismatch publish, PUBACK 0x87
        assert summary.stats.acked == summary.stats.sent - 1 >= 60

        silent = f"{prefix}mh-000001"

        def senders() -> set[str]:
            with listener._lock:
                return {
                    m.topic.split("/")[2]
                    for m in listener.messages
                    if m.topic.split("/")[2].startswith(prefix) and m.topic.endswith("/telemetry")
                }

        def wills() -> list[bytes]:
            with listener._lock:
                return [
                    bytes(m.payload)
                    for m in listener.messages
                    if m.topic == f"city/manhole/{silent}/status"
                ]

        await wait_for(
            lambda: senders() == device_ids - {silent},
            timeout=10,
            message=f"devices heard (so far {sorted(senders())})",
        )
        # the silent device dropped off with DISCONNECT 0x04: the broker published its will
        await wait_for(lambda: wills() == [b'{"online":false}'], timeout=10, message="last will")
        assert summary.by_what.get("went_silent") == 1
        conn = await asyncpg.connect(database_url)
        try:
            stored = await conn.fetchval(
                "SELECT count(*) FROM device_credentials WHERE device_id LIKE $1", prefix + "%"
            )
            assert stored == 8
        finally:
            await conn.close()
    finally:
        listener.close()
        await asyncio.to_thread(edit_devices, mqtt_settings, add={}, remove=device_ids)


async def test_a_refused_connect_fails_fast_with_the_reason(mqtt_settings: MqttSettings) -> None:
    publisher = MqttPublisher(
        host=mqtt_settings.host,
        port=mqtt_settings.port,
        client_id=f"it-bad-{uuid.uuid4().hex[:6]}",
        username=mqtt_settings.gateway_username,
        password="not-the-password",
        stats=PublishStats(),
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(MqttConnectError, match="refused"):
        await publisher.connect(timeout=10.0)
    assert asyncio.get_running_loop().time() - started < 5.0
