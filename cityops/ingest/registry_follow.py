"""Follow the compacted `city.devices.v1` topic and apply each registry change to the cache.

No consumer group: every replica needs every change, so the follower assigns itself all
partitions and keeps its positions in memory. It starts at the END of the topic, and takes those
positions BEFORE the PostgreSQL snapshot is read (main waits for `positioned`):

- a change committed before the snapshot is read is in the snapshot;
- a change committed after it is published after its commit (the API publishes post-commit),
  so it sits at or past the recorded end offsets and is read here.

Reading from the beginning instead would replay the whole history of the registry at every
start (slower with every device provisioned), and the topic is not the source of truth: a row
changed in PostgreSQL without an event (a failed publish, a bulk SQL import) would be overwritten
by an older event until the next refresh. Changes read while a full reload is in flight are
journaled and replayed onto the snapshot (RegistryCache.begin_snapshot), and every change is
compared with the cached row's `updated_at`, so a replayed or reordered event never regresses
the cache. PostgreSQL stays the safety net: the periodic refresh still runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.common.kinds import Kind
from cityops.common.topics import is_valid_device_id
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.registry_cache import RegistryCache
from cityops.ingest.registry_lookup import DeviceRow

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 256 * 1024  # a device document is well under 1 KiB plus its metadata
_FETCH_WAIT_MS = 5_000
_MAX_BACKOFF_S = 15.0
_START_TIMEOUT_S = 30.0


class _DeviceDocument(BaseModel):
    """The fields of the API's device document (cityops/api/outbox/relay.py) ingest uses."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    device_id: str
    kind: Kind
    enabled: bool
    updated_at: AwareDatetime | None = None


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """One record of the devices topic: the device's row now, or None when it was deleted."""

    device_id: str
    row: DeviceRow | None


class InvalidRecordError(ValueError):
    """A devices-topic record ingest cannot use."""


def parse_device_record(key: bytes | None, value: bytes | None) -> DeviceChange:
    """Turn a devices-topic record into a change; a null value is a tombstone (deleted)."""
    if key is None:
        raise InvalidRecordError("record has no key")
    try:
        device_id = key.decode()
    except UnicodeDecodeError as exc:
        raise InvalidRecordError("key is not UTF-8") from exc
    if not is_valid_device_id(device_id):
        raise InvalidRecordError(f"key {device_id[:80]!r} is not a device id")
    if value is None:
        return DeviceChange(device_id, None)
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecordError(f"value is {len(value)} bytes")
    try:
        document = _DeviceDocument.model_validate_json(value)
    except ValidationError as exc:
        raise InvalidRecordError(f"not a device document: {exc.error_count()} errors") from exc
    if document.device_id != device_id:
        raise InvalidRecordError("document device_id differs from the key")
    updated_at: datetime | None = document.updated_at
    return DeviceChange(
        device_id, DeviceRow(device_id, document.kind, document.enabled, updated_at)
    )


def apply_change(cache: RegistryCache, change: DeviceChange) -> str:
    """Apply one change; returns the outcome label (applied, deleted, stale)."""
    if change.row is None:
        cache.forget(change.device_id)
        return "deleted"
    return "applied" if cache.upsert(change.row) else "stale"


class DevicesFollower:
    """Consumes the devices topic (all partitions, no group) into the registry cache."""

    def __init__(
        self,
        *,
        access: KafkaAccess,
        topic: str,
        client_id: str,
        cache: RegistryCache,
        metrics: IngestMetrics,
    ) -> None:
        self._access = access
        self._topic = topic
        self._client_id = client_id
        self._cache = cache
        self._metrics = metrics
        self._next: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self.positioned = asyncio.Event()
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the topic until `stop`; broker errors are logged and retried with backoff."""
        delay = 0.5
        while not stop.is_set():
            # Subscribed without a group: aiokafka assigns every partition of the topic (and
            # new ones when the partition count grows); "earliest" only applies to partitions
            # without a position, i.e. added later, whose records are all new.
            consumer = kafka_consumer(
                self._access,
                self._topic,
                client_id=self._client_id,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            try:
                # A subscribed consumer's start() waits for a missing topic to be auto-created,
                # logging an error each retry: ask whether it exists first, and bound start().
                if await self._topic_exists():
                    async with asyncio.timeout(_START_TIMEOUT_S):
                        await consumer.start()
                if consumer.assignment() and await self._assign(consumer):
                    delay = 0.5
                    await self._consume(consumer, stop)
                else:
                    log.warning(
                        "devices topic not found; following it when it appears",
                        extra={"topic": self._topic, "retry_in_s": delay},
                    )
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning(
                    "devices topic follower failed: %s",
                    exc,
                    extra={"topic": self._topic, "retry_in_s": delay},
                )
            finally:
                # Never hold up the snapshot: without the topic, refresh and lookups still work.
                self.positioned.set()
                await consumer.stop()
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, _MAX_BACKOFF_S)

    async def _topic_exists(self) -> bool:
        """Whether the broker lists the devices topic (one metadata request)."""
        probe = kafka_consumer(self._access, client_id=self._client_id)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await probe.start()
                return self._topic in await probe.topics()
        finally:
            await probe.stop()

    async def _assign(self, consumer: AIOKafkaConsumer) -> bool:
        """Position every assigned partition: where we were, else at the end; False if none."""
        assigned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if not assigned:
            return False
        fresh = [tp for tp in assigned if tp not in self._next]
        for tp in assigned:
            if tp in self._next:
                consumer.seek(tp, self._next[tp])
        if fresh:
            await consumer.seek_to_end(*fresh)
            for tp in fresh:
                self._next[tp] = await consumer.position(tp)
        log.info(
            "following the devices topic",
            extra={"topic": self._topic, "partitions": len(assigned)},
        )
        self.positioned.set()
        return True

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=_FETCH_WAIT_MS))
                await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    fetch.cancel()
                    return
                for tp, records in fetch.result().items():
                    for record in records:
                        self._apply(record.key, record.value, record.offset)
                    if records:
                        self._next[tp] = records[-1].offset + 1
        finally:
            stopped.cancel()

    def _apply(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        counter = self._metrics.registry_topic_records
        try:
            change = parse_device_record(key, value)
        except InvalidRecordError as exc:
            counter.labels("invalid").inc()
            log.warning(
                "ignored a devices-topic record: %s",
                exc,
                extra={"topic": self._topic, "offset": offset},
            )
            return
        outcome = apply_change(self._cache, change)
        counter.labels(outcome).inc()
        self.applied += 1
        log.debug(
            "registry change from the devices topic",
            extra={"device_id": change.device_id, "outcome": outcome, "offset": offset},
        )
