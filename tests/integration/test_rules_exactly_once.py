"""Never duplicated: repeated triggers, replays and concurrent replicas give one ticket."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiokafka.partitioner import murmur2

from cityops.common.kinds import Kind
from cityops.common.registry import Device
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import (
    Feed,
    make_rules_env,
    reading,
    register,
    running_worker,
    tickets,
    transitions,
    wait_ticket,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _processed(database_url: str, device_id: str, seq: int) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        last = await conn.fetchval(
            "SELECT last_seq FROM rule_state WHERE device_id = $1", device_id
        )
    finally:
        await conn.close()
    return bool(last == seq)


def _done(database_url: str, device_id: str, seq: int) -> Callable[[], Awaitable[bool]]:
    return lambda: _processed(database_url, device_id, seq)


async def test_fifty_triggers_two_replicas_then_a_replay_give_one_ticket(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    hot = f"wb-hot-{uuid.uuid4().hex[:6]}"
    others = [f"wb-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    await register(
        database_url,
        *(
            Device(device_id=d, kind=Kind.WASTEBIN, reporting_interval_s=3600)
            for d in [hot, *others]
        ),
    )
    async with Feed(env) as feed:
        async with running_worker(env.settings()), running_worker(env.settings()):
            await feed.readings(
                reading(hot, Kind.WASTEBIN, seq, fill_pct=91.0 + seq % 5) for seq in range(1, 51)
            )
            await feed.readings(
                reading(d, Kind.WASTEBIN, seq, fill_pct=95.0) for d in others for seq in (1, 2)
            )
            await wait_for(_done(database_url, hot, 50), timeout=20, message="hot device done")
            ticket = await wait_ticket(database_url, device_id=hot, rule="bin_full")
            assert ticket["occurrences"] == 50
            for device_id in others:
                other = await wait_ticket(database_url, device_id=device_id, rule="bin_full")
                await wait_for(_done(database_url, device_id, 2), timeout=20, message="others done")
                assert (await tickets(database_url, id=other["id"]))[0]["occurrences"] == 2
        # a new consumer group replays the whole topic into the same database
        async with running_worker(env.settings(rules_group=f"{env.group}-replay")) as registry:
            await wait_for(
                lambda: (
                    registry.get_sample_value(
                        "cityops_rules_events_total", {"topic": "telemetry", "outcome": "duplicate"}
                    )
                    == 50 + 2 * len(others)
                ),
                timeout=20,
                message="replay read",
            )
    after = await tickets(database_url, device_id=hot)
    assert len(after) == 1 and after[0]["occurrences"] == 50
    assert [t["action"] for t in await transitions(database_url, after[0]["id"])] == ["opened"]
    assert len(await tickets(database_url)) == 1 + len(others)


async def test_two_groups_racing_on_one_database_count_each_reading_once(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    # Two independent groups on one stream is the worst case for the database fence: both
    # see every reading and both try to write. The loser must roll back and replay.
    env = await make_rules_env(kafka_topics, kafka, database_url)
    devices = [f"mh-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    await register(
        database_url,
        *(Device(device_id=d, kind=Kind.MANHOLE, reporting_interval_s=3600) for d in devices),
    )
    async with Feed(env) as feed:
        await feed.readings(
            reading(d, Kind.MANHOLE, seq, cover_open=False, gas_ppm=60.0 + seq)
            for seq in range(1, 51)
            for d in devices
        )
        async with (
            running_worker(env.settings(rules_group=f"{env.group}-a", rules_batch_max=20)) as a,
            running_worker(env.settings(rules_group=f"{env.group}-b", rules_batch_max=20)) as b,
        ):
            for device_id in devices:
                await wait_for(
                    _done(database_url, device_id, 50), timeout=30, message="all processed"
                )
            conflicts = sum(
                r.get_sample_value("cityops_rules_state_conflicts_total") or 0 for r in (a, b)
            )
            assert conflicts >= 1  # the fence was exercised, not dodged by timing
    rows = await tickets(database_url, rule="gas_hazard")
    assert sorted(r["device_id"] for r in rows) == sorted(devices)
    assert all(r["occurrences"] == 50 for r in rows), [r["occurrences"] for r in rows]


async def test_a_fenced_batch_is_rolled_back_and_replayed_without_losing_its_other_devices(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    suffix = uuid.uuid4().hex[:6]
    contested = f"wb-contested-{suffix}"
    bystanders = [f"wb-by-{i}-{suffix}" for i in range(10)]
    async with running_worker(env.settings()) as registry, Feed(env) as feed:
        warm_up = f"wb-warm-{suffix}"  # once its ticket exists, partitions are assigned
        await feed.readings([reading(warm_up, Kind.WASTEBIN, 1, fill_pct=97.0)])
        await wait_ticket(database_url, device_id=warm_up, rule="bin_full")
        # another writer (a zombie replica) stores this device's state behind our back
        partition = (murmur2(contested.encode()) & 0x7FFFFFFF) % 3
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO rule_state (device_id, kind, kafka_partition, last_seq) "
                "VALUES ($1, 'wastebin', $2, 0)",
                contested,
                partition,
            )
        finally:
            await conn.close()
        await feed.readings(
            reading(d, Kind.WASTEBIN, 1, fill_pct=97.0) for d in [contested, *bystanders]
        )
        for device_id in [contested, *bystanders]:
            ticket = await wait_ticket(database_url, device_id=device_id, rule="bin_full")
            assert ticket["occurrences"] == 1
        assert (registry.get_sample_value("cityops_rules_state_conflicts_total") or 0) >= 1
