"""Kafka-side pure logic: Kafka-compatible partitioning and per-partition batch grouping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from cityops.common.kafka import KafkaAccess
from cityops.ingest.kafka_sink import (
    KafkaSink,
    KeyPartitioner,
    group_by_partition,
    kafka_partition,
    positive_murmur2,
)
from tests.helpers import wait_for

# Utils.murmur2 results from Apache Kafka's own UtilsTest (signed 32-bit, as Java returns them).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
# Partitions out of 1000 that Kafka's Java default partitioner picks (kafka-python's vectors).
JAVA_PARTITION_OF_1000 = {
    b"": 681,
    b"a": 524,
    b"ab": 434,
    b"abc": 107,
    b"123456789": 566,
    b"\x00 ": 742,
}


@pytest.mark.parametrize(("key", "signed"), sorted(JAVA_MURMUR2.items()))
def test_the_hash_is_kafkas_murmur2_made_positive(key: bytes, signed: int) -> None:
    assert positive_murmur2(key) == signed & 0x7FFFFFFF


@pytest.mark.parametrize(("key", "partition"), sorted(JAVA_PARTITION_OF_1000.items()))
def test_partitions_match_the_java_default_partitioner(key: bytes, partition: int) -> None:
    assert kafka_partition(key, 1000) == partition
    assert KeyPartitioner()(key, 1000) == partition


def test_the_cached_partitioner_agrees_with_the_uncached_one_for_any_partition_count() -> None:
    partitioner = KeyPartitioner(max_keys=10)
    keys = [f"wb-{n:04d}".encode() for n in range(50)]  # more keys than the cache holds
    for partitions in (1, 3, 12, 7):
        for key in keys:
            assert partitioner(key, partitions) == kafka_partition(key, partitions)


def test_null_keys_spread_round_robin() -> None:
    partitioner = KeyPartitioner()
    picked = [partitioner(None, 3) for _ in range(6)]
    assert sorted(picked) == [0, 0, 1, 1, 2, 2]


@dataclass
class Rec:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] | None = None


def test_records_group_per_topic_and_partition_in_receive_order() -> None:
    keys = [b"sl-0001", b"mh-0002", b"sl-0001", b"pk-0003", b"sl-0001"]
    records = [Rec("tel", key, str(n).encode()) for n, key in enumerate(keys)]
    records.insert(2, Rec("dl", b"sl-0001", b"bad"))
    groups = group_by_partition(records, {"tel": 4, "dl": 2}, KeyPartitioner())
    # Every record exactly once, each in the group of its own topic and Kafka partition.
    assert sorted(id(r) for g in groups.values() for r in g) == sorted(id(r) for r in records)
    for (topic, partition), group in groups.items():
        for record in group:
            assert record.topic == topic
            assert record.key is not None
            assert partition == kafka_partition(record.key, 4 if topic == "tel" else 2)
        # Order inside a group is receive order.
        assert group == [r for r in records if r in group]
    sl = groups[("tel", kafka_partition(b"sl-0001", 4))]
    assert [r.value for r in sl if r.key == b"sl-0001"] == [b"0", b"2", b"4"]
    assert ("dl", kafka_partition(b"sl-0001", 2)) in groups


def test_an_unknown_topic_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(KeyError):
        group_by_partition([Rec("nope", b"k", b"v")], {"tel": 3}, KeyPartitioner())


class FakeProducer:
    """create_batch/send_batch/partitions_for; a submission can be held like a queued batch."""

    def __init__(self, partitions: int = 2) -> None:
        self.partitions = partitions
        self.submitted: list[tuple[str, int, list[bytes]]] = []
        self.delivered: list[asyncio.Future[Any]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail_next: Exception | None = None
        self.flushed = self.stopped = False

    async def flush(self) -> None:
        self.flushed = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(16_384, 0)  # 0: no compression

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        await self.hold.wait()  # the partition's previous batch is still queued
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        records = MemoryRecords(bytes(batch._build()))
        values: list[bytes] = []
        while (read := records.next_batch()) is not None:
            values.extend(record.value for record in read)
        self.submitted.append((topic, partition, values))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.delivered.append(future)
        return future


def sink_with(producer: FakeProducer) -> KafkaSink:
    sink = KafkaSink(
        access=KafkaAccess("unused:9092"),
        client_id="unit",
        compression="none",
        max_batch_bytes=16_384,
        request_timeout_ms=1000,
    )
    sink._producer = producer
    return sink


async def test_records_wait_in_a_staged_batch_while_their_partition_is_busy() -> None:
    producer = FakeProducer(partitions=1)
    sink = sink_with(producer)
    first = await sink.send_many([Rec("tel", b"k", b"1"), Rec("tel", b"k", b"2")])
    await wait_for(lambda: len(producer.submitted) == 1, timeout=1)
    producer.hold.clear()  # the next submission waits (the previous batch is not drained yet)
    second = await sink.send_many([Rec("tel", b"k", b"3")])
    await asyncio.sleep(0.01)  # the partition's worker takes 3 and waits to submit it
    third = await sink.send_many([Rec("tel", b"k", b"4")])
    fourth = await sink.send_many([Rec("tel", b"k", b"5")])
    await asyncio.sleep(0.01)
    producer.hold.set()
    await wait_for(lambda: len(producer.submitted) == 3, timeout=1)
    # 3 went out alone (its worker was already waiting with it); 4 and 5 were merged into one.
    assert [values for _, _, values in producer.submitted] == [
        [b"1", b"2"],
        [b"3"],
        [b"4", b"5"],
    ]
    assert [len(records) for _, records in first + second + third + fourth] == [2, 1, 1, 1]
    assert third[0][0] is fourth[0][0]  # one batch, one delivery future
    assert not third[0][0].done()
    producer.delivered[2].set_result("meta")
    assert await fourth[0][0] == "meta"
    assert not first[0][0].done()  # each batch settles on its own delivery
    await sink.stop()


async def test_a_batch_the_producer_refuses_fails_only_its_own_records() -> None:
    producer = FakeProducer(partitions=1)
    sink = sink_with(producer)
    producer.fail_next = KafkaTimeoutError()
    refused = await sink.send_many([Rec("tel", b"k", b"1")])
    with pytest.raises(KafkaTimeoutError):
        await refused[0][0]
    accepted = await sink.send_many([Rec("tel", b"k", b"2")])
    await wait_for(lambda: len(producer.delivered) == 1, timeout=1)
    producer.delivered[0].set_result(None)
    await accepted[0][0]
    assert [values for _, _, values in producer.submitted] == [[b"2"]]
    await sink.stop()


async def test_a_full_batch_spills_into_the_next_one_in_order() -> None:
    producer = FakeProducer(partitions=1)
    sink = sink_with(producer)
    producer.hold.clear()
    records = [Rec("tel", b"k", bytes([65 + n]) * 3000) for n in range(12)]  # > 16 KiB total
    groups = await sink.send_many(records)
    assert len(groups) >= 2
    assert [r for _, group in groups for r in group] == records
    producer.hold.set()
    await wait_for(lambda: len(producer.submitted) == len(groups), timeout=1)
    assert [v for _, _, values in producer.submitted for v in values] == [r.value for r in records]
    await sink.stop()
