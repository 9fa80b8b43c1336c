"""The API's transactional outbox against real Kafka and PostgreSQL.

(a) a ticket transition and a device registration each put exactly one record on their topic
and leave the outbox empty; (b) with Kafka unreachable for the API's producer the HTTP calls
still succeed and the events wait in the outbox, and a replica that can reach Kafka sweeps
them out; (c) two relays racing over one outbox publish every row once, in order per key.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from cityops.api import main as api_main
from cityops.api.metrics import create_metrics
from cityops.api.outbox import store as store_outbox
from cityops.api.outbox.relay import EventPublisher
from cityops.api.outbox.store import OutboxEvent
from cityops.api.settings import ApiSettings
from cityops.common.kafka import KafkaAccess, kafka_consumer, kafka_producer
from cityops.common.tickets import TicketEvent
from tests.helpers import wait_for
from tests.integration.api_support import (
    ApiCase,
    RunningApi,
    open_ticket,
    run_api,
)
from tests.integration.kafka_support import StackKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
PARTITIONS = 3  # what the kafka_topics fixture creates


async def _outbox(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT id, topic, key, payload::text AS payload FROM api_outbox ORDER BY id"
        )
        return rows
    finally:
        await conn.close()


async def _topic_records(access: KafkaAccess, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic`, read up to the end offsets taken now."""
    consumer = kafka_consumer(access, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + 15
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, "topic not read to its end in 15 s"
            fetched = await consumer.getmany(timeout_ms=200)
            for batch in fetched.values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def _sample(api: RunningApi, name: str, **labels: str) -> float:
    value = api.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_transition_and_registration_each_publish_one_record_and_empty_the_outbox(
    api_case: ApiCase, database_url: str
) -> None:
    topics = api_case.topics
    settings = api_case.settings(
        api_projector_enabled=False,
    )
    device_id = f"wb-{uuid.uuid4().hex[:10]}"
    ticket_id = await open_ticket(database_url, device_id=device_id)
    async with run_api(settings) as api, api.client() as http:
        created = await http.post(
            "/v1/devices",
            json={"device_id": device_id, "kind": "wastebin", "district": "north"},
        )
        assert created.status_code == 201, created.text
        moved = await http.post(
            f"/v1/tickets/{ticket_id}/transitions",
            json={"to": "acknowledged", "version": 1, "assignee": "crew-3"},
        )
        assert moved.status_code == 200, moved.text

        async def outbox_empty() -> bool:
            return not await _outbox(database_url)

        await wait_for(outbox_empty, timeout=10, message="outbox relayed")
        published = "cityops_api_outbox_events_published_total"
        assert _sample(api, published, topic=topics["city.devices.v1"]) == 1
        assert _sample(api, published, topic=topics["city.tickets.v1"]) == 1
        assert (
            _sample(api, "cityops_api_outbox_events_failed_total", topic=topics["city.tickets.v1"])
            == 0
        )
        detail = (await http.get(f"/v1/tickets/{ticket_id}")).json()

    devices = await _topic_records(api_case.kafka.admin, topics["city.devices.v1"])
    assert len(devices) == 1
    assert devices[0].key == device_id.encode()
    assert devices[0].value is not None
    document = orjson.loads(devices[0].value)
    assert (document["device_id"], document["kind"], document["district"]) == (
        device_id,
        "wastebin",
        "north",
    )
    assert document["enabled"] is True

    tickets = await _topic_records(api_case.kafka.admin, topics["city.tickets.v1"])
    assert len(tickets) == 1
    assert tickets[0].key == device_id.encode()
    assert tickets[0].value is not None
    event = TicketEvent.model_validate_json(tickets[0].value)
    acknowledged = detail["transitions"][-1]
    assert (event.transition_id, event.ticket_id, event.status, event.version, event.actor) == (
        acknowledged["id"],
        ticket_id,
        "acknowledged",
        2,
        acknowledged["actor"],
    )


async def test_kafka_unreachable_keeps_events_in_the_outbox_until_a_sweep_publishes_them(
    api_case: ApiCase, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = api_case.topics
    dead_bootstrap = f"127.0.0.1:{_closed_port()}"

    async def unreachable_producer(settings: ApiSettings, stop: asyncio.Event) -> AIOKafkaProducer:
        # The API's producer points at a closed port: every produce times out.
        return kafka_producer(KafkaAccess(dead_bootstrap), acks="all", enable_idempotence=True)

    settings = api_case.settings(
        api_projector_enabled=False,
        api_outbox_publish_timeout_s=3,
        api_outbox_sweep_s=1,
    )
    device_id = f"wb-{uuid.uuid4().hex[:10]}"
    ticket_id = await open_ticket(database_url, device_id=device_id)
    monkeypatch.setattr(api_main, "start_producer", unreachable_producer)
    async with run_api(settings) as api, api.client() as http:
        started = time.monotonic()
        created = await http.post(
            "/v1/devices",
            json={"device_id": device_id, "kind": "wastebin", "district": "south"},
        )
        moved = await http.post(
            f"/v1/tickets/{ticket_id}/transitions", json={"to": "in_progress", "version": 1}
        )
        elapsed = time.monotonic() - started
        assert created.status_code == 201, created.text
        assert moved.status_code == 200, moved.text
        # committed and answered without waiting for Kafka (a produce attempt takes 3 s here)
        assert elapsed < 2.5, elapsed

        def ticket_event_failed() -> bool:
            failed = "cityops_api_outbox_events_failed_total"
            return _sample(api, failed, topic=topics["city.tickets.v1"]) >= 1

        await wait_for(ticket_event_failed, timeout=20, message="a failed relay of the ticket")
        await wait_for(
            lambda: _sample(api, "cityops_api_outbox_backlog_events") == 2,
            timeout=20,
            message="backlog gauge at 2",
        )
        assert _sample(api, "cityops_api_outbox_oldest_age_seconds") > 0
        assert (
            _sample(
                api, "cityops_api_outbox_events_published_total", topic=topics["city.tickets.v1"]
            )
            == 0
        )
        ready = await http.get("/readyz")
        assert ready.json()["checks"]["database"] is True

    # The first replica is gone; its events are still there, nothing reached Kafka.
    waiting = await _outbox(database_url)
    assert [(r["topic"], r["key"]) for r in waiting] == [
        (topics["city.devices.v1"], device_id),
        (topics["city.tickets.v1"], device_id),
    ]
    assert await _topic_records(api_case.kafka.admin, topics["city.tickets.v1"]) == []
    assert await _topic_records(api_case.kafka.admin, topics["city.devices.v1"]) == []

    # A replica that reaches Kafka sweeps them out at start.
    monkeypatch.undo()
    async with run_api(settings) as api:

        async def outbox_empty() -> bool:
            return not await _outbox(database_url)

        await wait_for(outbox_empty, timeout=15, message="the sweep relayed the outbox")
        published = "cityops_api_outbox_events_published_total"
        assert _sample(api, published, topic=topics["city.devices.v1"]) == 1
        assert _sample(api, published, topic=topics["city.tickets.v1"]) == 1

    devices = await _topic_records(api_case.kafka.admin, topics["city.devices.v1"])
    assert [r.key for r in devices] == [device_id.encode()]
    assert devices[0].value is not None
    assert orjson.loads(devices[0].value)["district"] == "south"
    tickets = await _topic_records(api_case.kafka.admin, topics["city.tickets.v1"])
    assert len(tickets) == 1
    assert tickets[0].value is not None
    event = TicketEvent.model_validate_json(tickets[0].value)
    assert (event.ticket_id, event.status, event.version) == (ticket_id, "in_progress", 2)
    assert orjson.loads(waiting[1]["payload"])["transition_id"] == event.transition_id


async def test_two_relays_racing_publish_each_row_once_in_order_per_key(
    database_url: str, kafka: StackKafka, kafka_topics: Any
) -> None:
    topics = await kafka_topics("city.devices.v1")
    topic = topics["city.devices.v1"]
    keys = [f"dev-{n:02d}" for n in range(20)]
    rows = 600
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    producers = [kafka_producer(kafka.service("api"), acks="all") for _ in "ab"]
    try:
        async with pool.acquire() as conn:
            await store_outbox.append(
                conn,
                events=[
                    OutboxEvent(topic, keys[i % len(keys)], orjson.dumps({"n": i}))
                    for i in range(rows)
                ],
            )
        for producer in producers:
            await producer.start()
        relays = [
            EventPublisher(
                producer=producer,
                pool=pool,
                metrics=create_metrics(CollectorRegistry()),
                devices_topic=topic,
                tickets_topic=topic,
                publish_timeout_s=10,
                sweep_interval_s=10,
                batch_max=50,  # many small batches, so the two relays interleave
            )
            for producer in producers
        ]
        relayed = await asyncio.gather(*(relay.relay() for relay in relays))
        assert sum(relayed) == rows
        assert all(count > 0 for count in relayed), relayed  # they took turns
        assert await pool.fetchval("SELECT count(*) FROM api_outbox") == 0
    finally:
        for producer in producers:
            await producer.stop()
        await pool.close()

    records = await _topic_records(kafka.admin, topic)
    assert len(records) == rows  # no row published twice
    per_key: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None and record.value is not None
        per_key.setdefault(record.key, []).append(orjson.loads(record.value)["n"])
    assert set(per_key) == {k.encode() for k in keys}
    for numbers in per_key.values():
        assert numbers == sorted(numbers)
