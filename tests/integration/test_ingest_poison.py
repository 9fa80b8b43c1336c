"""No poison pills and bounded dead letters (issue 12, rows 1 and 7), over the real MQTT broker.

The poison corpus (tests/ingest_poison.py) is published between valid readings of the same
devices: every poison is dead-lettered with its reason, every valid reading arrives, and
ingest stays ready. One device sending 100 payloads of 200 KB leaves well under 1 MB in the
dead-letter topic, and the counts of what was not copied add up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import ConsumerRecord

from cityops.common.kafka import ensure_topics, kafka_admin
from cityops.common.kinds import Kind
from cityops.common.topics import DEADLETTER_TOPIC_CONFIG
from tests.ingest_poison import CORPUS
from tests.integration.conftest import MakeTopics
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
    readyz,
    seqs_of,
    settings_from,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]

FAST = {"CITYOPS_INGEST_RATE_PER_S": "100000", "CITYOPS_INGEST_RATE_BURST": "100000"}


def record_bytes(record: ConsumerRecord[bytes, bytes]) -> int:
    """What a record holds: key, value and headers (Kafka's own framing aside)."""
    headers = sum(len(name) + len(value) for name, value in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers


async def test_the_poison_corpus_is_dead_lettered_and_the_readings_around_it_arrive(
    case: IngestCase,
) -> None:
    devices = {case.device(f"p{n}"): poison for n, poison in enumerate(CORPUS)}
    await case.seed({device: Kind(poison.kind) for device, poison in devices.items()})
    messages: list[tuple[str, bytes]] = []
    for device, poison in devices.items():
        topic = f"city/{poison.kind}/{device}/telemetry"
        messages += [
            (topic, reading(device, poison.kind, 1, past(20))),
            (topic, poison.payload(device)),
            (topic, reading(device, poison.kind, 2, past(10))),
        ]
    env = case.replica_env(0, **FAST)
    port = settings_from(env).metrics_port
    publisher = await asyncio.to_thread(gateway, case.mqtt)
    try:
        async with (
            ingest_in_process(env),
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
            TopicReader(case.kafka.admin, case.deadletter) as deadletter,
        ):
            await asyncio.to_thread(publish_all, publisher, messages)
            await telemetry.until(
                lambda records: all(seqs_of(records, d) == {1, 2} for d in devices),
                within_s=30,
                message="every valid reading around the poison",
            )
            ours = {d.encode() for d in devices}
            await deadletter.until(
                lambda records: {r.key for r in records} >= ours,
                within_s=30,
                message="every poison dead-lettered",
            )
            body = await asyncio.to_thread(readyz, port)
            assert body is not None and body["ready"], body  # nothing stopped the loop
    finally:
        await asyncio.to_thread(publisher.close)
    for device, poison in devices.items():
        letters = [r for r in deadletter.records if r.key == device.encode()]
        assert len(letters) == 1, poison.name
        headers = headers_of(letters[0])
        assert poison.reason is not None
        assert headers["reason"] == poison.reason.value.encode(), poison.name
        assert headers["detail"].decode("utf-8").isprintable(), poison.name
        assert seqs_of(telemetry.records, device) == {1, 2}, poison.name  # the poison is not


async def test_a_flood_of_200_kb_payloads_from_one_device_leaves_under_a_megabyte(
    case: IngestCase,
) -> None:
    """Row 7: 100 x 200 KB used to become 20 MB of dead letters in 0.3 s."""
    device = case.device("flood")
    await case.seed({device: Kind.WASTEBIN})
    topic = f"city/wastebin/{device}/telemetry"
    payloads = [bytes([n]) * 200_000 for n in range(100)]
    env = case.replica_env(0, CITYOPS_INGEST_DEADLETTER_SUMMARY_S="0.5", **FAST)
    port = settings_from(env).metrics_port
    publisher = await asyncio.to_thread(gateway, case.mqtt)
    try:
        async with (
            ingest_in_process(env),
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
            TopicReader(case.kafka.admin, case.deadletter) as deadletter,
        ):
            await asyncio.to_thread(
                publish_all, publisher, [(topic, payload) for payload in payloads]
            )
            await asyncio.to_thread(
                publish_all, publisher, [(topic, reading(device, "wastebin", 1, past(1)))]
            )

            def accounted(records: list[ConsumerRecord[bytes, bytes]]) -> int:
                ours = [r for r in records if r.key == device.encode()]
                return sum(int(headers_of(r).get("suppressed", b"1")) for r in ours)

            await deadletter.until(
                lambda records: accounted(records) >= 100,
                within_s=30,
                message="all 100 rejects copied or counted",
            )
            await telemetry.until(
                lambda records: seqs_of(records, device) == {1},
                within_s=30,
                message="the valid reading after the flood",
            )
            suppressed = await asyncio.to_thread(
                metric_value,
                port,
                "cityops_ingest_deadletters_suppressed_total",
                {"reason": "too_large"},
            )
    finally:
        await asyncio.to_thread(publisher.close)
    ours = [r for r in deadletter.records if r.key == device.encode()]
    copies = [r for r in ours if "suppressed" not in headers_of(r)]
    summaries = [r for r in ours if "suppressed" in headers_of(r)]
    total = sum(record_bytes(r) for r in ours)
    print(f"100 x 200 KB -> {len(copies)} copies + {len(summaries)} summaries, {total} bytes")
    assert total < 1_000_000
    assert accounted(deadletter.records) == 100
    assert {headers_of(r)["reason"] for r in ours} == {b"too_large"}
    assert len(copies) == 20  # CITYOPS_INGEST_DEADLETTER_BURST's default
    for record in copies:  # each copy: a 4 KiB prefix, the size and the hash of the whole
        original = payloads[record.value[0]]
        assert record.value == original[:4096]
        assert headers_of(record)["original_size"] == b"200000"
        assert headers_of(record)["sha256"] == hashlib.sha256(original).hexdigest().encode()
    assert all(r.value == b"" for r in summaries)
    assert suppressed == 100 - len(copies)


async def test_the_dead_letter_topic_gets_its_size_cap_new_or_existing(
    case: IngestCase, kafka_topics: MakeTopics, caplog: pytest.LogCaptureFixture
) -> None:
    own = {"max.message.bytes": "2000000"}  # an operator's setting on the existing topic
    existing = (await kafka_topics("city.deadletter.v1", partitions=1, configs=own))[
        "city.deadletter.v1"
    ]
    fresh = f"city.deadletter.v1.{uuid.uuid4().hex[:12]}"
    names = (existing, fresh)
    caplog.set_level(logging.INFO, logger="cityops.common.kafka")

    async def ensure() -> list[str]:
        return await ensure_topics(
            case.kafka.admin,
            topics=dict.fromkeys(names, 1),
            configs=dict.fromkeys(names, DEADLETTER_TOPIC_CONFIG),
        )

    assert await ensure() == [fresh]
    admin = kafka_admin(case.kafka.admin)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, None) for name in names]
        )
        found: dict[str, dict[str, str]] = {}
        for response in responses:
            for _code, _message, _type, name, entries in response.resources:
                found[name] = {entry[0]: entry[1] for entry in entries}
        for name in names:
            capped = {k: found[name][k] for k in DEADLETTER_TOPIC_CONFIG}
            assert capped == dict(DEADLETTER_TOPIC_CONFIG), name
        assert found[existing]["max.message.bytes"] == "2000000"  # merged, not replaced
        caplog.clear()
        assert await ensure() == []
        assert not [r for r in caplog.records if r.getMessage() == "set topic configs"]
    finally:
        await admin.delete_topics([fresh])
        await admin.close()
