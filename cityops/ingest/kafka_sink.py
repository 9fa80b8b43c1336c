"""The Kafka side: one idempotent aiokafka producer, acks=all, lz4; record batches built here.

The pipeline hands over everything it validated in one loop turn; `send_many` partitions it
exactly like Kafka's default partitioner (murmur2 of the key), builds one record batch per
(topic, partition) and submits it with `send_batch`: one delivery future per batch instead of
one `send()` coroutine, accumulator lookup and future per record. Idempotence is unaffected:
the producer id, epoch and sequence numbers are stamped on a batch when the sender drains it,
the same path `send()`'s batches take.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from cityops.common.kafka import KafkaAccess, kafka_producer

log = logging.getLogger(__name__)


class OutRecord(Protocol):
    """A record to produce (the pipeline's pending entries are these)."""

    @property
    def topic(self) -> str:
        """Kafka topic."""

    @property
    def key(self) -> bytes | None:
        """Record key (the device id), None for a dead letter without one."""

    @property
    def value(self) -> bytes:
        """Record value."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None:
        """Record headers."""


R = TypeVar("R", bound=OutRecord)


def positive_murmur2(key: bytes) -> int:
    """Kafka's `Utils.toPositive(Utils.murmur2(key))`: the hash its default partitioner uses."""
    hashed: int = murmur2(key) & 0x7FFFFFFF
    return hashed


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key` among `partitions`."""
    return positive_murmur2(key) % partitions


class KeyPartitioner:
    """Kafka's default keyed partitioning, with the hash memoised per key.

    aiokafka's murmur2 is pure Python (~5 us for a device id); the set of device ids is
    bounded by the registry, so each id is hashed once. Null keys (dead letters whose topic
    names no device) go round-robin.
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys
        self._next_unkeyed = 0

    def __call__(self, key: bytes | None, partitions: int) -> int:
        """The partition of `key` in a topic with `partitions` partitions."""
        if key is None:
            self._next_unkeyed += 1
            return self._next_unkeyed % partitions
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = positive_murmur2(key)
        return hashed % partitions


def group_by_partition(
    records: Sequence[R],
    partitions_of: Mapping[str, int],
    partitioner: Callable[[bytes | None, int], int],
) -> dict[tuple[str, int], list[R]]:
    """Group records by (topic, partition), keeping their order inside each group."""
    groups: dict[tuple[str, int], list[R]] = {}
    for record in records:
        topic = record.topic
        where = (topic, partitioner(record.key, partitions_of[topic]))
        group = groups.get(where)
        if group is None:
            groups[where] = [record]
        else:
            group.append(record)
    return groups


@dataclass(slots=True, eq=False)
class _Staged:
    """A record batch being filled, and the delivery future its records were promised."""

    builder: BatchBuilder
    future: asyncio.Future[Any]


@dataclass(slots=True, eq=False)
class _Lane:
    """One (topic, partition): staged batches waiting their turn, and the task submitting them."""

    staged: deque[_Staged] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None


def _settle(ours: asyncio.Future[Any], delivered: asyncio.Future[Any]) -> None:
    if ours.done():
        return
    if delivered.cancelled():
        ours.cancel()
    elif (exc := delivered.exception()) is not None:
        ours.set_exception(exc)
    else:
        ours.set_result(delivered.result())


class KafkaSink:
    """Produces records and returns the delivery future of each."""

    def __init__(
        self,
        *,
        access: KafkaAccess,
        client_id: str,
        compression: str,
        max_batch_bytes: int,
        request_timeout_ms: int,
    ) -> None:
        self._access = access
        self._options: dict[str, Any] = {
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": None if compression == "none" else compression,
            "max_batch_size": max_batch_bytes,
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": 200,
        }
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = KeyPartitioner()
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self.started = False

    async def start(self, stop: asyncio.Event) -> bool:
        """Connect, retrying with backoff until connected (True) or `stop` is set (False)."""
        delay = 0.5
        while not stop.is_set():
            producer = kafka_producer(self._access, **self._options)
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                await producer.stop()
                log.warning("kafka connect failed: %s", exc, extra={"retry_in_s": delay})
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    delay = min(delay * 2, 15.0)
                continue
            self._producer = producer
            self.started = True
            log.info("kafka producer started", extra={"bootstrap": self._access.bootstrap})
            return True
        return False

    async def send_many(self, records: Sequence[R]) -> list[tuple[asyncio.Future[Any], list[R]]]:
        """Produce `records` as record batches, one per (topic, partition), in order.

        Returns each batch's delivery future with the records of this call it carries; the
        future resolves when Kafka (all in-sync replicas) has the whole batch, and fails if the
        batch could not be produced, so the caller retries exactly those records. Never waits
        for Kafka: while a partition's previous batch is still queued in the producer, records
        for it collect in a staged batch (the same thing `send()` does with its open batch).
        """
        producer = self._producer
        assert producer is not None, "start() first"
        loop = asyncio.get_running_loop()
        partitions_of: dict[str, int] = {}
        for topic in {record.topic for record in records}:
            partitions_of[topic] = len(await producer.partitions_for(topic))
        timestamp_ms = int(time.time() * 1000)
        out: list[tuple[asyncio.Future[Any], list[R]]] = []
        for where, group in group_by_partition(records, partitions_of, self._partitioner).items():
            lane = self._lanes.get(where)
            if lane is None:
                lane = self._lanes[where] = _Lane()
            staged = lane.staged[-1] if lane.staged else None
            carried: list[R] = []
            for record in group:
                headers = list(record.headers) if record.headers else []
                if (
                    staged is None
                    or staged.builder.append(
                        key=record.key, value=record.value, timestamp=timestamp_ms, headers=headers
                    )
                    is None
                ):  # no staged batch, or it is full (max_batch_bytes): start another
                    if staged is not None and carried:
                        out.append((staged.future, carried))
                        carried = []
                    staged = _Staged(producer.create_batch(), loop.create_future())
                    lane.staged.append(staged)
                    staged.builder.append(  # the first record always fits
                        key=record.key, value=record.value, timestamp=timestamp_ms, headers=headers
                    )
                carried.append(record)
            if staged is not None and carried:
                out.append((staged.future, carried))
            if lane.worker is None:
                lane.worker = loop.create_task(self._drive(where, lane))
        return out

    async def _drive(self, where: tuple[str, int], lane: _Lane) -> None:
        """Hand a partition's staged batches to the producer one after the other, in order."""
        producer = self._producer
        assert producer is not None
        topic, partition = where
        try:
            while lane.staged:
                staged = lane.staged.popleft()
                # Batched by the caller already. No linger: at low rates a batch leaves at once;
                # at high rates records pile up in the staged batch while the partition's
                # previous batch is in flight, which is the batching a linger would buy.
                staged.builder.close()
                try:
                    # Waits while this partition's previous batch is still queued in the producer.
                    delivered = await producer.send_batch(
                        staged.builder, topic, partition=partition
                    )
                except Exception as exc:  # any producer error: the caller retries these records
                    staged.future.set_exception(exc)
                    continue
                delivered.add_done_callback(functools.partial(_settle, staged.future))
        finally:
            lane.worker = None

    async def stop(self) -> None:
        """Hand over the staged batches, flush what is queued and close."""
        if self._producer is not None:
            workers = [lane.worker for lane in self._lanes.values() if lane.worker is not None]
            await asyncio.gather(*workers, return_exceptions=True)
            try:
                await self._producer.flush()
            finally:
                await self._producer.stop()
                self._producer = None
                self.started = False
