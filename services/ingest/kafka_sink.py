"""The Kafka side: one idempotent aiokafka producer, acks=all, lz4, short linger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

log = logging.getLogger(__name__)


class CachedKeyPartitioner:
    """Kafka's default (Java-compatible murmur2) partitioning, memoised per key.

    aiokafka's murmur2 is pure Python (~5 us for a device id); the set of device ids is
    bounded by the registry, so each id is hashed once.
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        """Pick the partition for `key` (null keys spread over available partitions)."""
        if key is None:
            pool = available or all_partitions
            return pool[len(self._hashes) % len(pool)]
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = murmur2(key) & 0x7FFFFFFF
            self._hashes[key] = hashed
        return all_partitions[hashed % len(all_partitions)]


class KafkaSink:
    """Produces records and returns the delivery future of each."""

    def __init__(
        self,
        *,
        bootstrap: str,
        client_id: str,
        linger_ms: int,
        compression: str,
        max_batch_bytes: int,
        request_timeout_ms: int,
    ) -> None:
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "compression_type": None if compression == "none" else compression,
            "max_batch_size": max_batch_bytes,
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": 200,
            "partitioner": CachedKeyPartitioner(),
        }
        self._producer: AIOKafkaProducer | None = None
        self.started = False

    async def start(self, stop: asyncio.Event) -> bool:
        """Connect, retrying with backoff until connected (True) or `stop` is set (False)."""
        delay = 0.5
        while not stop.is_set():
            producer = AIOKafkaProducer(**self._options)
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
            log.info(
                "kafka producer started", extra={"bootstrap": self._options["bootstrap_servers"]}
            )
            return True
        return False

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one record; the future resolves when Kafka (all in-sync replicas) has it."""
        assert self._producer is not None, "start() first"
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key, headers=list(headers) if headers else None
        )
        return future

    async def stop(self) -> None:
        """Flush what is queued and close."""
        if self._producer is not None:
            try:
                await self._producer.flush()
            finally:
                await self._producer.stop()
                self._producer = None
                self.started = False
