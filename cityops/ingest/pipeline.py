"""The ingest loop: receive -> validate -> produce -> PUBACK in receive order once Kafka has it.

A message is acknowledged to the broker only after Kafka acknowledged the record made from it
(the reading, the status event, or its dead-letter record), and acknowledgements leave in the
order messages arrived. A failed delivery is retried in place and holds back every later ack,
so a Kafka outage stops acks, the in-flight window fills, reading from MQTT pauses and memory
stays bounded; the broker keeps everything else in the persistent session.

Readings whose device the registry cache has never heard of are held for one batched
PostgreSQL lookup per turn (registry_lookup.MissResolver) and then validated again. The turn
waits for that lookup (bounded by its timeout) instead of letting later messages overtake the
held ones: records reach Kafka in receive order, per device and overall, exactly as without the
lookup, and the acks keep receive order because entries still join the pending window in order.

Rejects go through the per-device dead-letter budget (deadletters.py): a reject past it gets a
pending entry that is already released (no record; acked in its turn), and its count goes into
a summary record the loop produces once per summary interval and at close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from prometheus_client import Counter

from cityops.common.kinds import Kind, RejectReason
from cityops.common.topics import Channel
from cityops.ingest.deadletters import RejectBudget, deadletter_record, summary_record
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.mqtt_source import Inbound
from cityops.ingest.registry_lookup import MissResolver
from cityops.ingest.validate import Accepted, Rejected, Validator, clip

log = logging.getLogger(__name__)

_MAX_RETRY_DELAY_S = 5.0
_NO_CONNECTION = -1  # the generation of records no MQTT message waits for (never acked)


class Source(Protocol):
    """What the pipeline needs from the MQTT side."""

    def ack(self, mid: int, generation: int) -> None:
        """Queue a PUBACK."""

    def pause(self) -> None:
        """Stop reading."""

    def resume(self) -> None:
        """Read again."""


class Sink(Protocol):
    """What the pipeline needs from the Kafka side."""

    async def send_many(
        self, records: Sequence[_Pending]
    ) -> list[tuple[asyncio.Future[Any], list[_Pending]]]:
        """Queue records; one future per group of them, resolved when Kafka has the group."""


@dataclass(slots=True, eq=False)
class _Pending:
    mid: int
    generation: int
    received_mono: float
    topic: str
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]] | None
    future: asyncio.Future[Any] | None = None
    attempts: int = 0


@dataclass(slots=True)
class PipelineStats:
    """Counters for the shutdown summary and the benchmark."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    acked: int = 0
    delivery_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Pipeline:
    """Owns the in-flight window between the MQTT source and the Kafka sink."""

    def __init__(
        self,
        *,
        validator: Validator,
        sink: Sink,
        metrics: IngestMetrics,
        ingest_id: str,
        max_in_flight: int,
        resolver: MissResolver | None = None,
        reject_budget: RejectBudget | None = None,
        deadletter_prefix_bytes: int = 4096,
        summary_interval_s: float = 10.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._validator = validator
        self._sink = sink
        self._metrics = metrics
        self._ingest_id = ingest_id
        self._max_in_flight = max_in_flight
        self._resume_below = max(1, max_in_flight // 2)
        self._clock = clock
        self._resolver = resolver
        self._budget = reject_budget or RejectBudget(rate_per_s=0.1, burst=20)
        self._prefix_bytes = deadletter_prefix_bytes
        self._summary_interval_s = summary_interval_s
        self._summary_timer: asyncio.TimerHandle | None = None
        self._summaries_due = False
        self._turn_suppressed = 0
        # The delivery future of suppressed rejects: nothing to wait for (created in run()).
        self._released: asyncio.Future[Any] | None = None
        # Registry misses of the current turn waiting for the lookup, and their device ids.
        self._held: list[tuple[Inbound, datetime, float]] = []
        self._held_ids: dict[str, None] = {}
        self._source: Source | None = None
        self._queue: deque[tuple[list[Inbound], datetime, float]] = deque()
        self._queued = 0
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._paused = False
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self.stats = PipelineStats()
        # Resolved label children: `.labels()` costs more than the increment itself.
        self._accepted_counters: dict[tuple[Kind, Channel], tuple[Counter, Counter]] = {}
        self.last_delivery_error: float | None = None
        self._last_error_log = 0.0
        self.last_delivery_ok: float | None = None

    def bind(self, source: Source) -> None:
        """Attach the MQTT source that receives acks and flow control."""
        self._source = source

    # ---- input (called from the source on the event loop) --------------------------------

    def submit(self, batch: list[Inbound]) -> None:
        """Take a batch of received messages."""
        self._queue.append((batch, self._clock(), time.monotonic()))
        self._queued += len(batch)
        self._idle.clear()
        self._wake.set()
        if self.in_flight >= self._max_in_flight:
            self._pause()

    @property
    def in_flight(self) -> int:
        """Received and not yet acknowledged."""
        return self._queued + len(self._pending)

    def oldest_pending_age(self) -> float:
        """Seconds the oldest unacknowledged message has waited (0 when none)."""
        if self._pending:
            return time.monotonic() - self._pending[0].received_mono
        if self._queue:
            return time.monotonic() - self._queue[0][2]
        return 0.0

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Validate and produce until close() and the queue is empty."""
        self._released = asyncio.get_running_loop().create_future()
        self._released.set_result(None)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue or self._summaries_due:
                    await self._turn()
                self._metrics.in_flight.set(self.in_flight)
                if not self._pending:
                    self._idle.set()
                if self._closing and not self._queue:
                    return
        finally:
            if self._summary_timer is not None:
                self._summary_timer.cancel()
                self._summary_timer = None

    async def _turn(self) -> None:
        # Everything received since the last turn goes to Kafka together: one record batch per
        # (topic, partition), one delivery future per batch.
        entries: list[_Pending | None] = []
        taken = 0
        while self._queue:
            batch, received_at, received_mono = self._queue.popleft()
            taken += len(batch)
            entries.extend(self._process(inbound, received_at, received_mono) for inbound in batch)
        if self._held:
            await self._decide_held(entries)
        decided = cast("list[_Pending]", entries)  # every held entry is decided by now
        if self._summaries_due:
            self._summaries_due = False
            decided.extend(self._summaries())
        self._pending.extend(decided)
        self._queued -= taken  # only now: held messages stay counted as in flight
        if self._turn_suppressed:
            self._turn_suppressed = 0
            to_send = [entry for entry in decided if entry.future is None]
            if to_send:
                await self._send(to_send)
            self._release_acks()  # suppressed rejects at the head need no delivery
        else:
            await self._send(decided)

    async def close(self, *, within_s: float) -> bool:
        """Finish what was received, wait for Kafka and the acks up to `within_s`; True if all."""
        self._closing = True
        if self._budget.pending:  # the counts of suppressed rejects are not kept in memory
            self._summaries_due = True
            self._idle.clear()
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=within_s)
        except TimeoutError:
            return False
        return True

    async def _decide_held(self, entries: list[_Pending | None]) -> None:
        """Look up the held messages' devices (one query), then validate them again, in place."""
        held, self._held = self._held, []
        device_ids, self._held_ids = list(self._held_ids), {}
        assert self._resolver is not None
        await self._resolver.resolve(device_ids)
        again = iter(held)
        for index, entry in enumerate(entries):
            if entry is None:
                inbound, received_at, received_mono = next(again)
                entries[index] = self._process(inbound, received_at, received_mono, lookup=False)

    def _process(
        self, inbound: Inbound, received_at: datetime, received_mono: float, *, lookup: bool = True
    ) -> _Pending | None:
        """The pending entry for one message, or None when it is held for a registry lookup."""
        stats = self.stats
        mqtt_topic, result = self._decide(inbound, received_at)
        metrics = self._metrics
        if isinstance(result, Accepted):
            stats.received += 1
            stats.accepted += 1
            counters = self._accepted_counters.get((result.kind, result.channel))
            if counters is None:
                kind, channel = result.kind.value, result.channel.value
                counters = (
                    metrics.received.labels(kind, channel),
                    metrics.accepted.labels(kind, channel),
                )
                self._accepted_counters[(result.kind, result.channel)] = counters
            counters[0].inc()
            counters[1].inc()
            if result.measured_at is not None:
                metrics.sensor_lag.observe((received_at - result.measured_at).total_seconds())
            entry = _Pending(
                inbound.mid,
                inbound.generation,
                received_mono,
                result.topic,
                result.key,
                result.value,
                None,
            )
        else:
            if (
                lookup
                and result.reason is RejectReason.UNKNOWN_DEVICE
                and self._resolver is not None
                and result.key is not None
                and self._hold(result.key.decode(), inbound, received_at, received_mono)
            ):
                return None
            stats.received += 1
            stats.rejected += 1
            reason = result.reason
            stats.reasons[reason.value] = stats.reasons.get(reason.value, 0) + 1
            metrics.received.labels(
                result.kind.value if result.kind else "unknown",
                result.channel.value if result.channel else "unknown",
            ).inc()
            metrics.rejected.labels(reason.value).inc()
            entry = self._dead_letter(inbound, result, mqtt_topic, received_at, received_mono)
        return entry

    def _decide(self, inbound: Inbound, received_at: datetime) -> tuple[str, Accepted | Rejected]:
        """The message's topic as text and what validation made of it."""
        try:
            mqtt_topic = inbound.topic.decode()
        except UnicodeDecodeError:
            detail = clip(f"topic is not UTF-8: {inbound.topic!r}")
            return inbound.topic.decode(errors="replace"), Rejected(
                RejectReason.TOPIC, detail, None
            )
        if inbound.retained:
            return mqtt_topic, self._validator.refuse_retained(mqtt_topic)
        try:
            return mqtt_topic, self._validator.validate(mqtt_topic, inbound.payload, received_at)
        except Exception as exc:  # a validation bug must not stop the loop (A5)
            log.exception("validation failed", extra={"mqtt_topic": clip(mqtt_topic)})
            detail = clip(f"validation failed: {type(exc).__name__}")
            return mqtt_topic, Rejected(RejectReason.UNPROCESSABLE, detail, None)

    def _dead_letter(
        self,
        inbound: Inbound,
        rejected: Rejected,
        mqtt_topic: str,
        received_at: datetime,
        received_mono: float,
    ) -> _Pending:
        """The dead letter of a reject, or past its device's budget an entry already released."""
        reason = rejected.reason
        if not self._budget.admit(rejected.key, reason, mqtt_topic, received_mono):
            self._metrics.deadletters_suppressed.labels(reason.value).inc()
            self._turn_suppressed += 1
            self._schedule_summaries()
            return _Pending(
                inbound.mid,
                inbound.generation,
                received_mono,
                self._validator.topics.deadletter,
                rejected.key,
                b"",
                None,
                future=self._released,
            )
        value, headers = deadletter_record(
            reason,
            rejected.detail,
            inbound.payload,
            mqtt_topic=mqtt_topic,
            received_at=received_at,
            ingest_id=self._ingest_id,
            prefix_bytes=self._prefix_bytes,
        )
        return _Pending(
            inbound.mid,
            inbound.generation,
            received_mono,
            self._validator.topics.deadletter,
            rejected.key,
            value,
            headers,
        )

    def _schedule_summaries(self) -> None:
        if self._summary_timer is None:
            loop = asyncio.get_running_loop()
            self._summary_timer = loop.call_later(self._summary_interval_s, self._summaries_ready)

    def _summaries_ready(self) -> None:
        self._summary_timer = None
        self._summaries_due = True
        self._idle.clear()
        self._wake.set()

    def _summaries(self) -> list[_Pending]:
        """One record per (device, reason) with suppressed rejects; no MQTT message to ack."""
        now, mono = self._clock(), time.monotonic()
        entries: list[_Pending] = []
        for suppressed in self._budget.take_summaries():
            value, headers = summary_record(suppressed, received_at=now, ingest_id=self._ingest_id)
            entries.append(
                _Pending(
                    0,
                    _NO_CONNECTION,
                    mono,
                    self._validator.topics.deadletter,
                    suppressed.key,
                    value,
                    headers,
                )
            )
        return entries

    def _hold(
        self, device_id: str, inbound: Inbound, received_at: datetime, received_mono: float
    ) -> bool:
        """Hold a registry miss for this turn's lookup if the resolver wants it looked up."""
        held_ids = self._held_ids
        resolver = self._resolver
        assert resolver is not None
        if device_id not in held_ids:
            if not resolver.wants(device_id, len(held_ids)):
                return False
            held_ids[device_id] = None
        self._held.append((inbound, received_at, received_mono))
        return True

    async def _send(self, entries: list[_Pending]) -> None:
        try:
            groups = await self._sink.send_many(entries)
        except Exception as exc:  # any producer error means "retry later", never drop
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            groups = [(failed, entries)]
        for future, group in groups:
            for entry in group:
                entry.future = future
            future.add_done_callback(functools.partial(self._on_delivered, group))

    # ---- delivery and acks ---------------------------------------------------------------

    def _on_delivered(self, group: list[_Pending], future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._retry(group, exc)
            return
        self._release_acks()

    def _release_acks(self) -> None:
        """Ack the delivered entries at the head of the window, in receive order."""
        pending = self._pending
        source = self._source
        now = time.monotonic()
        acked = 0
        while pending:
            head = pending[0]
            done = head.future
            # A failed head has future None until its retry is sent: it holds back later acks.
            if done is None or not done.done() or done.cancelled() or done.exception():
                break
            pending.popleft()
            if source is not None:
                source.ack(head.mid, head.generation)
            if not acked:
                # One observation per released run of acks (one Kafka batch, typically):
                # the oldest message's latency, the one operators care about.
                self._metrics.produce_latency.observe(now - head.received_mono)
            acked += 1
        if acked:
            self.stats.acked += acked
            self.last_delivery_ok = now
            self._metrics.acked.inc(acked)
            self._metrics.in_flight.set(self.in_flight)
            if self._paused and self.in_flight <= self._resume_below:
                self._resume()
        if not pending and not self._queued and not self._summaries_due:
            self._idle.set()  # `_queued` counts a turn still held for a lookup

    def _retry(self, group: list[_Pending], exc: BaseException) -> None:
        attempts = 0
        for entry in group:
            entry.future = None  # holds back every later ack until the resend is delivered
            entry.attempts += 1
            attempts = max(attempts, entry.attempts)
        self.stats.delivery_failures += len(group)
        self.last_delivery_error = time.monotonic()
        self._metrics.kafka_errors.inc(len(group))
        delay = min(0.2 * 2 ** min(attempts, 10), _MAX_RETRY_DELAY_S)
        now = time.monotonic()
        if now - self._last_error_log >= 1.0:  # one line a second, not one per batch
            self._last_error_log = now
            log.warning(
                "kafka delivery failed, retrying: %s",
                exc,
                extra={
                    "topic": group[0].topic,
                    "records": len(group),
                    "attempt": attempts,
                    "in_flight": self.in_flight,
                },
            )
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._start_resend, group)

    def _start_resend(self, group: list[_Pending]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(group))
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    def _pause(self) -> None:
        if not self._paused and self._source is not None:
            self._paused = True
            self._source.pause()

    def _resume(self) -> None:
        if self._paused and self._source is not None and not self._closing:
            self._paused = False
            self._source.resume()
