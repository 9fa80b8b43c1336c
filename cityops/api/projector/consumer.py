"""The read-model projector: Kafka telemetry and status into device_state, readings, connectivity.

Consumer group `api-projector` (a setting); offsets are committed only after the PostgreSQL
statement that wrote a batch, at most once per commit interval (an offset commit is a write to
the broker's `__consumer_offsets`: one per batch cost the API, rules and the broker more CPU
than the batches themselves at a steady 2,000 msgs/s). Every write is idempotent (seq guard,
ON CONFLICT), so a crash or rebalance replays at most one commit interval and changes nothing.

Nothing stops it. A lost database or Kafka is retried forever with capped backoff, and the
projector catches up by itself. A record it cannot process (undecodable, or a value PostgreSQL
refuses) is set aside on the dead-letter topic with its reason: a batch whose write PostgreSQL
refuses for its data is bisected until the bad record is alone, the rest is written. `healthy()`
says whether it is progressing (for /readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from cityops.api.db import Conn
from cityops.api.metrics import ApiMetrics
from cityops.api.projector import store as store_state
from cityops.api.projector.fold import ProjectionBatch, ReadingRow, fold, telemetry_row
from cityops.common.events import StatusEvent, decode_status
from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.common.kinds import Kind
from cityops.common.setaside import UNDECODABLE, UNPROCESSABLE, SetAside, describe, is_data_error

log = logging.getLogger(__name__)

# pg_try_advisory_lock key for partition maintenance: one replica at a time does it.
_MAINTENANCE_LOCK = 0x6369747900A1
# Backoff of a failed write or Kafka call: these delays, then the last one forever.
_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# What a write can fail with: the data (bisected, set aside) or a dependency (retried).
_WRITE_ERRORS = (
    *_DB_ERRORS,
    ValueError,
    TypeError,
    OverflowError,
)
# Below this many records a batch is written in one lane.
_LANE_MIN_RECORDS = 500


Decoded = tuple[ConsumerRecord[bytes, bytes], ReadingRow | StatusEvent]


def decode_records(
    records: Sequence[ConsumerRecord[bytes, bytes]],
    *,
    telemetry_topic: str,
    metrics: ApiMetrics,
) -> tuple[list[Decoded], list[tuple[ConsumerRecord[bytes, bytes], str]]]:
    """Decode a fetched batch: (record, event) pairs, and (record, reason) for undecodable ones."""
    events: list[Decoded] = []
    undecodable: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
    for record in records:
        source = "telemetry" if record.topic == telemetry_topic else "status"
        try:
            value = record.value if record.value is not None else b""
            if source == "telemetry":
                events.append((record, telemetry_row(value)))
            else:
                events.append((record, decode_status(value)))
        except (ValueError, KeyError, TypeError, OverflowError, ValidationError) as exc:
            metrics.projector_invalid.labels(source).inc()
            undecodable.append((record, describe(exc)))
            continue
        metrics.projector_records.labels(source).inc()
    return events, undecodable


async def write_batch(conn: Conn, batch: ProjectionBatch) -> tuple[int, int]:
    """Write one folded batch atomically; returns (state rows moved, readings inserted)."""
    return await store_state.write_batch(
        conn,
        readings=batch.readings.values(),
        states=batch.states,
        connectivity=list(batch.connectivity.values()),
    )


class Projector:
    """Consumes telemetry and status, writes the read model, commits after the write."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        access: KafkaAccess,
        topics: Sequence[str],
        telemetry_topic: str,
        group_id: str,
        metrics: ApiMetrics,
        batch_max: int,
        fetch_timeout_ms: int,
        partitions_ahead_days: int,
        retention_days: Mapping[Kind, int],
        maintenance_interval_s: float,
        client_id: str,
        set_aside: SetAside,
        write_lanes: int = 2,
        commit_interval_s: float = 1.0,
        stall_s: float = 30.0,
    ) -> None:
        self._set_aside = set_aside
        self._stall_s = stall_s
        self._lanes = write_lanes
        self._commit_interval_s = commit_interval_s
        self._pool = pool
        self._access = access
        self._topics = list(topics)
        self._telemetry_topic = telemetry_topic
        self._group_id = group_id
        self._metrics = metrics
        self._batch_max = batch_max
        self._fetch_timeout_ms = fetch_timeout_ms
        self._partitions_ahead_days = partitions_ahead_days
        self._retention_days = dict(retention_days)
        self._maintenance_interval_s = maintenance_interval_s
        self._client_id = client_id
        self._lag: dict[TopicPartition, int] = {}
        # Next offset to read of every partition whose records are written to PostgreSQL, and
        # what was last committed: the committer sends the difference every interval.
        self._written: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self.commits = 0
        self.kafka_ok = False
        self.db_ok = True
        # when the projector last fetched and wrote (or found nothing to read): for healthy()
        self._progress_at = time.monotonic()
        self.batches = 0
        self.records = 0
        self.set_aside = 0

    def healthy(self) -> bool:
        """Kafka and PostgreSQL answer and a fetch completed within the stall limit."""
        stalled = time.monotonic() - self._progress_at > self._stall_s
        return self.kafka_ok and self.db_ok and not stalled

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set; the batch in flight is written and committed first."""
        try:
            await self.maintain_partitions()
        except _DB_ERRORS as exc:
            # Rows for a missing day land in readings_default: nothing is lost meanwhile.
            log.error("creating readings partitions failed: %s", exc)  # noqa: TRY400
        self._progress_at = time.monotonic()
        maintenance = asyncio.create_task(self._maintenance_loop(stop), name="partitions")
        committer: asyncio.Task[None] | None = None
        consumer: AIOKafkaConsumer | None = None
        try:
            consumer = await self._start_consumer(stop)
            if consumer is None:
                return  # stopped before Kafka answered
            committer = asyncio.create_task(self._commit_loop(consumer, stop), name="commits")
            while not stop.is_set():
                try:
                    fetched = await consumer.getmany(
                        timeout_ms=self._fetch_timeout_ms, max_records=self._batch_max
                    )
                except KafkaError as exc:
                    self.kafka_ok = False
                    log.warning("kafka fetch failed, retrying: %s", exc)
                    await _wait(stop, 1.0)
                    continue
                self.kafka_ok = True
                if fetched:
                    await self._project(consumer, fetched, stop)
                self._progress_at = time.monotonic()
        except _StoppedError:
            log.info("stopped during a write; the batch in flight will be replayed")
        finally:
            if committer is not None and consumer is not None:
                committer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await committer
                # Everything written is committed before leaving the group.
                await self._commit(consumer)
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            if consumer is not None:
                await consumer.stop()
            log.info(
                "projector stopped",
                extra={"batches": self.batches, "records": self.records, "commits": self.commits},
            )

    async def _start_consumer(self, stop: asyncio.Event) -> AIOKafkaConsumer | None:
        """A started group consumer, retried until Kafka answers; None if `stop` came first.

        A consumer whose start() failed cannot be started again (aiokafka asserts), so every
        attempt builds a new one.
        """
        attempt = 0
        while not stop.is_set():
            consumer = kafka_consumer(
                self._access,
                *self._topics,
                group_id=self._group_id,
                client_id=self._client_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            try:
                await consumer.start()
            except KafkaError as exc:
                with contextlib.suppress(KafkaError):
                    await consumer.stop()
                self.kafka_ok = False
                delay = _RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)]
                attempt += 1
                log.warning("kafka not reachable, retrying in %ss: %s", delay, exc)
                await _wait(stop, delay)
            else:
                self.kafka_ok = True
                return consumer
        return None

    async def _project(
        self,
        consumer: AIOKafkaConsumer,
        fetched: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        stop: asyncio.Event,
    ) -> None:
        started = time.perf_counter()
        records = [record for batch in fetched.values() for record in batch]
        # Partitions are split into disjoint lanes written concurrently on their own
        # connections: a device's records all live in one partition (key = device_id), so
        # lanes never touch the same rows, and PostgreSQL works on one lane while Python
        # decodes the next.
        # A small batch (the steady state: tens of records) goes in one statement: a second
        # lane would only add a round trip and a WAL flush.
        count = 1 if len(records) < _LANE_MIN_RECORDS else self._lanes
        lanes: list[list[ConsumerRecord[bytes, bytes]]] = [[] for _ in range(count)]
        for tp, batch_records in fetched.items():
            lanes[tp.partition % count].extend(batch_records)
        results = await asyncio.gather(*(self._write_lane(lane, stop) for lane in lanes if lane))
        moved = sum(result[0] for result in results)
        inserted = sum(result[1] for result in results)
        for tp, batch_records in fetched.items():
            if not batch_records:
                continue
            self._written[tp] = batch_records[-1].offset + 1  # committed by the commit loop
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self._lag[tp] = max(0, highwater - batch_records[-1].offset - 1)
        assigned = consumer.assignment()
        self._metrics.projector_lag.set(sum(lag for tp, lag in self._lag.items() if tp in assigned))
        self._metrics.projector_batch_records.observe(len(records))
        self._metrics.projector_batch_seconds.observe(time.perf_counter() - started)
        self._metrics.projector_state_updates.inc(moved)
        self._metrics.readings_written.inc(inserted)
        self.batches += 1
        self.records += len(records)
        log.debug(
            "projected batch",
            extra={"records": len(records), "states": moved, "readings": inserted},
        )

    async def _commit_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _wait(stop, self._commit_interval_s)
            await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the written offsets that moved since the last commit (assigned partitions)."""
        assigned = consumer.assignment()
        for tp in [tp for tp in self._written if tp not in assigned]:
            del self._written[tp]  # revoked: its new owner commits from now on
        offsets = {tp: o for tp, o in self._written.items() if self._committed.get(tp) != o}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: the new owner replays them; writes are idempotent.
            log.warning("offset commit failed (records will be replayed): %s", exc)
            return
        self._committed.update(offsets)
        self.commits += 1

    async def _write_lane(
        self, records: list[ConsumerRecord[bytes, bytes]], stop: asyncio.Event
    ) -> tuple[int, int]:
        """Write a lane's records, retrying an outage until it ends (or `stop` is set)."""
        events, undecodable = decode_records(
            records, telemetry_topic=self._telemetry_topic, metrics=self._metrics
        )
        attempt = 0
        while True:
            try:
                while undecodable:
                    record, detail = undecodable[0]
                    await self._park(record, reason=UNDECODABLE, detail=detail)
                    undecodable.pop(0)
                written = await self._write_or_bisect(events)
            except (*_WRITE_ERRORS, KafkaError) as exc:
                if stop.is_set():
                    # Not written, so not committed: replayed by the partitions' next owner.
                    raise _StoppedError from exc
                if isinstance(exc, KafkaError):
                    self.kafka_ok = False
                else:
                    self.db_ok = False
                delay = _RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)]
                attempt += 1
                self._metrics.projector_write_retries.inc()
                log.warning(
                    "read-model write failed, retrying in %ss: %s",
                    delay,
                    describe(exc),
                    extra={"attempt": attempt, "records": len(events)},
                )
                await _wait(stop, delay)
                continue
            self.db_ok = True
            return written

    async def _write_or_bisect(self, events: list[Decoded]) -> tuple[int, int]:
        """Write `events` in one statement; if PostgreSQL refuses their data, halve and retry.

        The records of one device stay in log order across the halves (each half is a
        contiguous slice), and every write is idempotent, so writing halves is writing the
        whole. A record refused on its own is set aside. Outage errors propagate.
        """
        batch = fold(event for _, event in events)
        if batch.empty:
            return 0, 0
        try:
            async with self._pool.acquire() as conn:
                return await write_batch(conn, batch)
        except _WRITE_ERRORS as exc:
            if not is_data_error(exc):
                raise
            if len(events) == 1:
                await self._park(events[0][0], reason=UNPROCESSABLE, detail=describe(exc))
                return 0, 0
            log.info(
                "read-model write refused its data; bisecting the batch",
                extra={"records": len(events), "error": describe(exc)},
            )
        middle = len(events) // 2
        first = await self._write_or_bisect(events[:middle])
        second = await self._write_or_bisect(events[middle:])
        return first[0] + second[0], first[1] + second[1]

    async def _park(
        self, record: ConsumerRecord[bytes, bytes], *, reason: str, detail: str
    ) -> None:
        await self._set_aside(record, reason=reason, detail=detail)
        self.set_aside += 1

    async def maintain_partitions(self) -> None:
        """Create partitions ahead and apply retention, if no other replica is doing it."""
        today = datetime.now(UTC).date()
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MAINTENANCE_LOCK):
                return
            try:
                created = await store_state.ensure_partitions(
                    conn, first_day=today, days=self._partitions_ahead_days + 1
                )
                dropped, deleted = await store_state.apply_retention(
                    conn, today=today, retention_days=self._retention_days
                )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MAINTENANCE_LOCK)
        log.info(
            "readings partitions maintained",
            extra={
                "partitions_created": created,
                "dropped": dropped,
                "deleted": deleted,
                "today": date.isoformat(today),
            },
        )

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        while True:
            await _wait(stop, self._maintenance_interval_s)
            if stop.is_set():
                return
            try:
                await self.maintain_partitions()
            except _DB_ERRORS as exc:
                log.warning("partition maintenance failed: %s", exc)


class _StoppedError(Exception):
    """A write was still failing when the service was asked to stop."""


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
