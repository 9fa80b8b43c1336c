"""Kafka refuses anonymous clients and holds each service principal to its ACLs (12.6).

Each attack is what an intruder on the network, or a compromised service, would try: produce
forged telemetry with no credentials (kcat -P, aiokafka), log in with a wrong password, write a
topic the principal may not, read another service's topic or join another service's group.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from cityops.common.kafka import KafkaAccess, kafka_consumer, kafka_producer, kcat_args
from tests.integration.conftest import MakeTopics
from tests.integration.kafka_support import StackKafka

pytestmark = pytest.mark.kafka

FORGED = b'{"device_id":"wb-forged","kind":"wastebin","seq":1,"fill_pct":1000}'


async def _produce_one(access: KafkaAccess, topic: str) -> None:
    producer = kafka_producer(access, acks="all", request_timeout_ms=5000)
    try:
        await asyncio.wait_for(producer.start(), 15)
        await asyncio.wait_for(producer.send_and_wait(topic, FORGED, key=b"wb-forged"), 15)
    finally:
        await producer.stop()


async def _read_all(access: KafkaAccess, topic: str) -> list[bytes]:
    consumer = kafka_consumer(access, topic, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=2000)
        return [r.value for records in batches.values() for r in records if r.value]
    finally:
        await consumer.stop()


@pytest.fixture
async def topics(kafka_topics: MakeTopics) -> Mapping[str, str]:
    return await kafka_topics(
        "city.telemetry.v1",
        "city.status.v1",
        "city.deadletter.v1",
        "city.tickets.v1",
        "city.devices.v1",
        partitions=1,
    )


async def test_a_producer_without_credentials_is_refused(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    anonymous = KafkaAccess(kafka.bootstrap)  # PLAINTEXT, no SASL: what kcat -P does by default
    with pytest.raises((KafkaConnectionError, KafkaError, TimeoutError)):
        await _produce_one(anonymous, topics["city.telemetry.v1"])
    process = await asyncio.create_subprocess_exec(
        "kcat", "-P", "-b", kafka.bootstrap, "-t", topics["city.telemetry.v1"],
        "-m", "10", "-X", "message.timeout.ms=8000",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(FORGED + b"\n"), 60)
    assert process.returncode != 0, stderr
    assert await _read_all(kafka.admin, topics["city.telemetry.v1"]) == []


async def test_a_wrong_password_is_refused(kafka: StackKafka, topics: Mapping[str, str]) -> None:
    ingest = kafka.service("ingest")
    wrong = KafkaAccess(ingest.bootstrap, username=ingest.username, password="not-the-password")
    with pytest.raises(KafkaError):
        await _produce_one(wrong, topics["city.telemetry.v1"])


async def test_only_ingest_writes_telemetry_and_status(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    for topic in ("city.telemetry.v1", "city.status.v1"):
        await _produce_one(kafka.service("ingest"), topics[topic])
        for service in ("rules", "api"):
            with pytest.raises(TopicAuthorizationFailedError):
                await _produce_one(kafka.service(service), topics[topic])
    assert await _read_all(kafka.admin, topics["city.telemetry.v1"]) == [FORGED]


async def test_tickets_are_written_by_rules_and_the_api_outbox_never_by_ingest(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    await _produce_one(kafka.service("rules"), topics["city.tickets.v1"])
    await _produce_one(kafka.service("api"), topics["city.tickets.v1"])
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce_one(kafka.service("ingest"), topics["city.tickets.v1"])
    # the devices topic is the API's alone (the registry ingest follows)
    await _produce_one(kafka.service("api"), topics["city.devices.v1"])
    for service in ("ingest", "rules"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce_one(kafka.service(service), topics["city.devices.v1"])


async def test_a_service_reads_only_what_it_consumes(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    assert await _read_all(kafka.service("ingest"), topics["city.devices.v1"]) == []
    with pytest.raises(TopicAuthorizationFailedError):
        await _read_all(kafka.service("ingest"), topics["city.telemetry.v1"])
    with pytest.raises(TopicAuthorizationFailedError):
        await _read_all(kafka.service("rules"), topics["city.devices.v1"])


async def test_a_service_cannot_join_another_services_group(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    consumer = kafka_consumer(
        kafka.service("rules"),
        topics["city.telemetry.v1"],
        group_id=f"api-projector-{uuid.uuid4().hex[:8]}",
    )
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            await asyncio.wait_for(consumer.start(), 20)
            await asyncio.wait_for(consumer.getone(), 20)
    finally:
        await consumer.stop()


async def test_kcat_with_the_admin_principal_is_let_in(
    kafka: StackKafka, topics: Mapping[str, str]
) -> None:
    with kcat_args(kafka.admin) as broker:
        process = await asyncio.create_subprocess_exec(
            "kcat", "-P", *broker, "-t", topics["city.status.v1"], stdin=asyncio.subprocess.PIPE
        )
        await asyncio.wait_for(process.communicate(FORGED + b"\n"), 30)
    assert process.returncode == 0
    assert await _read_all(kafka.admin, topics["city.status.v1"]) == [FORGED]
