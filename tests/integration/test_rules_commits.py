"""Offsets: committed after the database, coalesced over the commit interval, all at a stop."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka import TopicPartition

from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.common.kinds import Kind
from cityops.common.registry import Device
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import Feed, make_rules_env, reading, register, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _committed(access: KafkaAccess, group: str, topic: str) -> dict[int, int | None]:
    consumer = kafka_consumer(access, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(3)}
    finally:
        await consumer.stop()


async def _ends(access: KafkaAccess, topic: str) -> dict[int, int | None]:
    consumer = kafka_consumer(access)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(3)])
    finally:
        await consumer.stop()
    # a partition nobody wrote to has nothing to commit
    return {tp.partition: (end or None) for tp, end in ends.items()}


async def test_offsets_wait_for_the_interval_and_are_all_committed_at_a_stop(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    telemetry = env.topics["city.telemetry.v1"]
    devices = [f"wb-{i}-{uuid.uuid4().hex[:6]}" for i in range(9)]
    await register(
        database_url,
        *(Device(device_id=d, kind=Kind.WASTEBIN, reporting_interval_s=3600) for d in devices),
    )
    # An interval longer than the test: only the commit at the stop can write offsets.
    settings = env.settings(rules_commit_interval_ms=60_000)
    async with Feed(env) as feed:
        async with running_worker(settings) as registry:
            for seq in range(1, 6):
                await feed.readings(reading(d, Kind.WASTEBIN, seq, fill_pct=10.0) for d in devices)

            def read() -> float:
                value = registry.get_sample_value(
                    "cityops_rules_events_total", {"topic": "telemetry", "outcome": "processed"}
                )
                return value or 0.0

            await wait_for(lambda: read() == 45, timeout=20, message="45 readings evaluated")
            batches = registry.get_sample_value("cityops_rules_batch_records_count") or 0
            assert batches >= 1
            # Evaluated, but no batch was committed on its own: one commit per interval.
            assert set((await _committed(kafka.admin, env.group, telemetry)).values()) == {None}
        assert await _committed(kafka.admin, env.group, telemetry) == await _ends(
            kafka.admin, telemetry
        )
