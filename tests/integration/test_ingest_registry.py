"""Ingest knows a new device at once: devices topic, lookup on a miss, bounded cost of bogus ids.

Every test runs ingest with a 60 s registry refresh and starts it before the devices in question
exist, so the periodic refresh cannot explain any acceptance that happens within seconds.

Ingest subscribes to all of `city/+/+/...` on the shared broker, so other engineers' traffic may
reach it during a test (their ids are unknown to this test's fresh database: never `found`).
Assertions on shared counters are therefore exact for what only this test can cause (`found`
lookups, the test's own devices topic) and bounded by the foreign message count otherwise.
"""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.ingest_support import (
    IngestCase,
    TopicReader,
    gateway,
    headers_of,
    ingest_in_process,
    metric_value,
    past,
    publish_all,
    reading,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]

SLOW_REFRESH = {"CITYOPS_INGEST_REGISTRY_REFRESH_S": "60"}
WELL_BEFORE_REFRESH_S = 15.0  # every acceptance below must come well inside the 60 s refresh


async def metric(port: int, name: str, **labels: str) -> float:
    return await asyncio.to_thread(metric_value, port, name, labels)


def telemetry(device_id: str, seq: int) -> tuple[str, bytes]:
    return f"city/parking/{device_id}/telemetry", reading(device_id, "parking", seq, past(2))


async def publish(case: IngestCase, messages: list[tuple[str, bytes]]) -> None:
    client = gateway(case.mqtt)
    try:
        await asyncio.to_thread(publish_all, client, messages)
    finally:
        client.close()


async def test_a_device_published_on_the_devices_topic_is_accepted_at_once(
    case: IngestCase,
) -> None:
    fresh = case.device("pk-fresh")
    # Lookups off: only the devices topic can explain an acceptance before the refresh.
    env = case.replica_env(0, **SLOW_REFRESH, CITYOPS_INGEST_REGISTRY_LOOKUP_MAX_IDS="0")
    port = int(env["CITYOPS_METRICS_PORT"])
    async with ingest_in_process(env), TopicReader(case.kafka.admin, case.telemetry) as tel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await case.seed({fresh: Kind.PARKING})
        await case.publish_devices([fresh])
        await wait_for(
            lambda: metric(port, "cityops_ingest_registry_topic_records_total", outcome="applied"),
            timeout=WELL_BEFORE_REFRESH_S,
            message="the devices-topic record applied",
        )
        await publish(case, [telemetry(fresh, 1)])
        records = await tel.until(
            lambda rs: any(r.key == fresh.encode() for r in rs),
            within_s=WELL_BEFORE_REFRESH_S,
            message="the new device's reading accepted",
        )
        assert loop.time() - started < WELL_BEFORE_REFRESH_S
        accepted = [orjson.loads(r.value) for r in records if r.key == fresh.encode()]
        assert [body["seq"] for body in accepted] == [1]
        assert await metric(port, "cityops_ingest_registry_lookups_total") == 0


async def test_a_device_only_in_postgresql_is_accepted_on_the_miss_lookup(
    case: IngestCase,
) -> None:
    quiet = case.device("pk-quiet")
    env = case.replica_env(0, **SLOW_REFRESH)
    port = int(env["CITYOPS_METRICS_PORT"])
    async with (
        ingest_in_process(env),
        TopicReader(case.kafka.admin, case.telemetry) as tel,
        TopicReader(case.kafka.admin, case.deadletter) as dead,
    ):
        await case.seed({quiet: Kind.PARKING})  # no devices-topic event for this one
        await publish(case, [telemetry(quiet, 1), telemetry(quiet, 2)])
        records = await tel.until(
            lambda rs: len([r for r in rs if r.key == quiet.encode()]) == 2,
            within_s=WELL_BEFORE_REFRESH_S,
            message="both readings accepted after the lookup",
        )
        seqs = [orjson.loads(r.value)["seq"] for r in records if r.key == quiet.encode()]
        assert seqs == [1, 2]  # one partition per device: receive order kept
        found = await metric(port, "cityops_ingest_registry_lookup_devices_total", result="found")
        assert found == 1
        assert await metric(port, "cityops_ingest_registry_lookups_total", outcome="ok") >= 1
        assert await metric(port, "cityops_ingest_registry_topic_records_total") == 0
        await dead.poll()
        assert [r for r in dead.records if r.key == quiet.encode()] == []


async def test_a_device_disabled_on_the_devices_topic_is_refused(case: IngestCase) -> None:
    lamp = case.device("pk-lamp")
    await case.seed({lamp: Kind.PARKING})  # enabled and in the snapshot at start-up
    env = case.replica_env(0, **SLOW_REFRESH)
    port = int(env["CITYOPS_METRICS_PORT"])
    async with (
        ingest_in_process(env),
        TopicReader(case.kafka.admin, case.telemetry) as tel,
        TopicReader(case.kafka.admin, case.deadletter) as dead,
    ):
        await publish(case, [telemetry(lamp, 1)])
        await tel.until(
            lambda rs: any(r.key == lamp.encode() for r in rs),
            within_s=WELL_BEFORE_REFRESH_S,
            message="accepted while enabled",
        )
        conn = await asyncpg.connect(case.database_url)
        try:
            await conn.execute(
                "UPDATE devices SET enabled = false, updated_at = now() WHERE device_id = $1",
                lamp,
            )
        finally:
            await conn.close()
        await case.publish_devices([lamp])
        await wait_for(
            lambda: metric(port, "cityops_ingest_registry_topic_records_total", outcome="applied"),
            timeout=WELL_BEFORE_REFRESH_S,
            message="the disable applied from the topic",
        )
        await publish(case, [telemetry(lamp, 2)])
        records = await dead.until(
            lambda rs: any(r.key == lamp.encode() for r in rs),
            within_s=WELL_BEFORE_REFRESH_S,
            message="refused once disabled",
        )
        refused = [r for r in records if r.key == lamp.encode()]
        assert [headers_of(r)["reason"] for r in refused] == [b"unknown_device"]
        assert orjson.loads(refused[0].value)["seq"] == 2
        await tel.poll()
        assert [orjson.loads(r.value)["seq"] for r in tel.records if r.key == lamp.encode()] == [1]
        # Known and disabled: the cache's answer stands, PostgreSQL is not asked (had it been,
        # the row would have been found: foreign ids never are).
        found = await metric(port, "cityops_ingest_registry_lookup_devices_total", result="found")
        assert found == 0


async def test_bogus_ids_are_dead_lettered_with_one_lookup_per_id(case: IngestCase) -> None:
    ids = [case.device(f"pk-bogus{n}") for n in range(20)]
    env = case.replica_env(0, **SLOW_REFRESH)
    port = int(env["CITYOPS_METRICS_PORT"])
    keys = {device_id.encode() for device_id in ids}

    def ours(records: list[ConsumerRecord[bytes, bytes]]) -> list[ConsumerRecord[bytes, bytes]]:
        return [r for r in records if r.key in keys]

    first = [telemetry(device_id, 0) for device_id in ids]
    again = [telemetry(device_id, seq) for seq in range(1, 10) for device_id in ids]
    async with ingest_in_process(env), TopicReader(case.kafka.admin, case.deadletter) as dead:
        await publish(case, first)
        await dead.until(
            lambda rs: len(ours(rs)) >= len(first), within_s=30, message="first round refused"
        )
        await publish(case, again)
        records = await dead.until(
            lambda rs: len(ours(rs)) >= len(first) + len(again),
            within_s=30,
            message="every bogus reading dead-lettered",
        )
        mine = ours(records)
        assert len(mine) == len(first) + len(again)
        assert {headers_of(r)["reason"] for r in mine} == {b"unknown_device"}
        received = await metric(port, "cityops_ingest_received_messages_total")
        foreign = received - len(first) - len(again)
        absent = await metric(port, "cityops_ingest_registry_lookup_devices_total", result="absent")
        queries = await metric(port, "cityops_ingest_registry_lookups_total")
        hits = await metric(port, "cityops_ingest_registry_negative_cache_hits_total")
        found = await metric(port, "cityops_ingest_registry_lookup_devices_total", result="found")
        assert found == 0
        # Each of our ids asked about exactly once in the interval (foreign ids at most once
        # per message); every later reading of ours answered from the negative cache.
        assert len(ids) <= absent <= len(ids) + foreign
        assert 1 <= queries <= len(ids) + foreign
        assert hits >= len(again)
