"""The rules worker: consume readings and status, evaluate, write tickets, commit, publish.

One task drives everything: `getmany` waits for records or the next deadline, a batch is
evaluated in memory, its effects are written in one PostgreSQL transaction, then the ticket
events are produced (from the outbox). A record that is not a reading or status message, or
whose effects PostgreSQL refuses for their data, is set aside on the dead-letter topic and the
loop moves on: a batch refused for its data is rolled back and replayed one record at a time,
so the record at fault is found, set aside and skipped from then on. An outage is retried.
The Kafka offsets of written batches are committed at
most once per commit interval (and at a revocation or a clean stop): the committed offset is
never ahead of the database, so a crash replays at most an interval of records, which decide
nothing again (below). A rebalance
waits for the batch in flight (a lock), state is persisted for revoked partitions and
loaded for assigned ones. A database failure rolls the replica back to the database: state
is reloaded and the consumer rewinds to its committed offsets.

Which writes need per-device seq in the database? Only the ones that change something:
a batch persists the state of the devices it changed (tickets, duration timers) with their
last seq, in the same transaction, so a replay cannot count an occurrence twice. Readings
that change nothing are not written: after a crash they are re-read from the committed
offset and decide nothing again. The arrival time of the last message, needed by offline
timers, is persisted at most every half reporting interval per device (and exactly at a
revocation or a clean shutdown), and restored deadlines are pushed back by that much, so a
crash can delay an offline ticket by half an interval but never raise a false one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata

from cityops.common.events import EARLIEST_TS, LATEST_TS, decode_status
from cityops.common.kinds import KINDS, Kind, Priority
from cityops.common.registry import DEFAULT_REPORTING_INTERVAL_S, Device, load_devices
from cityops.common.setaside import UNDECODABLE, UNPROCESSABLE, SetAside, describe, is_data_error
from cityops.rules import engine, store
from cityops.rules.config import RuleSet
from cityops.rules.engine import (
    DURATION,
    ESCALATE,
    OFFLINE,
    DeviceState,
    DuskDawn,
    Effects,
    Escalate,
    Observation,
    OpenTicket,
    Seen,
    StatusObservation,
)
from cityops.rules.metrics import RulesMetrics
from cityops.rules.profiles import UNASSIGNED_DISTRICT, Profile, ProfileBook
from cityops.rules.publisher import TicketPublisher, outbox_events
from cityops.rules.settings import RulesSettings
from cityops.rules.timers import DeadlineHeap, TimerKey

log = logging.getLogger(__name__)

SYSTEM = "sys"
_REGISTRY = (SYSTEM, "registry", "")
_GAUGE = (SYSTEM, "gauge", "")
_SWEEP = (SYSTEM, "outbox", "")
_MAX_WAIT_S = 1.0
# A batch naming devices the registry cache does not know triggers an incremental refresh
# before it is decided (so a just-provisioned device's first ticket has its district), at
# most this often, so a stream from devices that are really unknown cannot hammer the DB.
_UNKNOWN_REFRESH_S = 1.0
# A partition at most this many records behind counts as caught up: a live stream is rarely
# at exactly zero lag, and device timers must not wait for that forever.
_CAUGHT_UP_RECORDS = 500
_MAX_BACKOFF_S = 5.0
_ENVELOPE = ("device_id", "kind", "seq", "ts", "received_at", "ingest_id")
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# What evaluating or writing a record's effects can fail with when the record is at fault.
_DATA_ERRORS = (ValueError, TypeError, OverflowError, KeyError)
# The contract's bounds on times (A3): every store accepts them, and a ticket can render them.
_MIN_TS = EARLIEST_TS.timestamp()
_MAX_TS = LATEST_TS.timestamp()
_MAX_SEQ = 2**63 - 1


_NONE = OffsetAndMetadata(-1, "")


class _IsolatedError(Exception):
    """A record refused for its data was set aside: reload state and replay without it."""


class BadRecordError(ValueError):
    """A record on an input topic that is not a reading or status message."""


def decode_observation(value: bytes | None) -> Observation:
    """A `city.telemetry.v1` value as an Observation (ingest validated the reading already)."""
    if value is None:
        raise BadRecordError("empty record")
    try:
        body = orjson.loads(value)
        device_id, kind, seq = body["device_id"], body["kind"], body["seq"]
        ts = datetime.fromisoformat(body["ts"]).timestamp()
        received_at = datetime.fromisoformat(body["received_at"]).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadRecordError(f"not a telemetry record: {exc}") from exc
    if not isinstance(device_id, str) or kind not in KINDS or type(seq) is not int:
        raise BadRecordError("bad device_id, kind or seq")
    if not 0 <= seq <= _MAX_SEQ:
        raise BadRecordError("seq out of range")
    if not (_MIN_TS <= ts <= _MAX_TS and _MIN_TS <= received_at <= _MAX_TS):
        raise BadRecordError("timestamp out of range")
    for name in _ENVELOPE:
        body.pop(name, None)
    return Observation(device_id, Kind(kind), seq, ts, received_at, body)


def decode_status_observation(value: bytes | None, offset: int) -> StatusObservation:
    """A `city.status.v1` value as a StatusObservation."""
    if value is None:
        raise BadRecordError("empty record")
    try:
        event = decode_status(value)
    except ValueError as exc:
        raise BadRecordError(f"not a status record: {exc}") from exc
    return StatusObservation(
        event.device_id, event.kind, event.online, event.received_at.timestamp(), offset
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, worker: RulesWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        await self._worker.on_assigned(assigned)


class RulesWorker:
    """Owns the in-memory state of its partitions and the consume-evaluate-commit loop."""

    def __init__(
        self,
        *,
        settings: RulesSettings,
        ruleset: RuleSet,
        pool: asyncpg.Pool,
        consumer: AIOKafkaConsumer,
        publisher: TicketPublisher,
        metrics: RulesMetrics,
        set_aside: SetAside,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._set_aside = set_aside
        # Records set aside, skipped when a rewind replays them (pruned once committed past).
        self._parked: set[tuple[str, int, int]] = set()
        # After a batch was refused for its data: replay up to these offsets one by one.
        self._isolate: dict[TopicPartition, int] = {}
        # Undecodable records of the batch being decided, dead-lettered after its commit.
        self._undecodable: list[tuple[ConsumerRecord, str]] = []
        self._progress_at = time.monotonic()
        self._settings = settings
        self._pool = pool
        self._consumer = consumer
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._book = ProfileBook(ruleset)
        self._dark = DuskDawn(lat=settings.city_lat, lon=settings.city_lon, tz=settings.city_tz)
        self._topics = (settings.topic_telemetry, settings.topic_status)
        self._lock = asyncio.Lock()
        self._timers = DeadlineHeap()
        self._states: dict[str, DeviceState] = {}
        self._profiles: dict[str, Profile] = {}
        self._devices: dict[str, Device] = {}
        self._districts: dict[str, dict[str, Any]] = {}
        self._registry_seen: datetime | None = None
        self._registry_miss_at = 0.0
        self._unknown_refresh_at = 0.0
        self._owned: set[int] = set()
        self._lagging: set[int] = set()
        self._deferred: dict[int, list[TimerKey]] = defaultdict(list)
        self._generation = 0
        # Offsets of batches already in the database, not yet committed to Kafka.
        self._uncommitted: dict[TopicPartition, OffsetAndMetadata] = {}
        self._committed_at = time.monotonic()
        self._joined = False
        self._db_ok = False
        self._kafka_ok = False
        self.processed = 0
        self.batches = 0
        self.failed = False  # the loop ended on an unexpected error (the service exits)

    # Readiness and lifecycle ----------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        """Dependencies, and whether the loop is turning (a batch or an idle fetch lately)."""
        stalled = time.monotonic() - self._progress_at > self._settings.rules_stall_s
        return {
            "database": self._db_ok,
            "kafka": self._kafka_ok,
            "group_joined": self._joined,
            "consumer": not stalled and not self.failed,
        }

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with."""
        return _Listener(self)

    async def start(self) -> None:
        """Load the registry and schedule the housekeeping timers."""
        await self._refresh_registry(full=True)
        self._db_ok = True
        now = self._clock()
        self._timers.schedule(_GAUGE, now)
        self._timers.schedule(_SWEEP, now)
        self._timers.schedule(_REGISTRY, now + self._settings.rules_registry_refresh_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in flight is finished and committed."""
        backoff = 0.1
        while not stop.is_set():
            generation = self._generation
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=int(self._wait_s() * 1000),
                    max_records=self._settings.rules_batch_max,
                )
                self._kafka_ok = True
            except KafkaError as exc:
                self._kafka_ok = False
                self._metrics.errors.labels("kafka").inc()
                log.warning(
                    "kafka fetch failed, backing off: %s", exc, extra={"backoff_s": backoff}
                )
                await _wait(stop, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            try:
                async with self._lock:
                    if generation != self._generation:
                        # A rebalance ran while fetching: state was reloaded, so rewind to
                        # what the database and the committed offsets agree on.
                        await self._rewind()
                        continue
                    if self._isolate and not self._isolate.keys().isdisjoint(batch):
                        await self._batch_one_by_one(batch)
                    else:
                        await self._batch(batch)
                    if (
                        time.monotonic() - self._committed_at
                        >= self._settings.rules_commit_interval_ms / 1000
                    ):
                        await self._commit_offsets()
                backoff = 0.1
                self._progress_at = time.monotonic()
            except _IsolatedError:
                await self._recover(stop)  # the record at fault is parked: replay without it
            except (*_DB_ERRORS, *_DATA_ERRORS, store.StateConflictError, KafkaError) as exc:
                if is_data_error(exc):
                    # The batch's data was refused: roll back, replay it one record at a time.
                    self._isolate_batch(batch, exc)
                    await self._recover(stop)
                    continue
                if isinstance(exc, store.StateConflictError):
                    self._metrics.state_conflicts.inc()
                elif isinstance(exc, KafkaError):
                    self._kafka_ok = False
                    self._metrics.errors.labels("kafka").inc()
                else:
                    self._db_ok = False
                    self._metrics.errors.labels("database").inc()
                log.warning("batch failed, reloading state: %s", exc, extra={"backoff_s": backoff})
                await _wait(stop, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                await self._recover(stop)

    def _isolate_batch(
        self, batch: Mapping[TopicPartition, list[ConsumerRecord]], exc: BaseException
    ) -> None:
        for tp, messages in batch.items():
            if messages:
                self._isolate[tp] = max(self._isolate.get(tp, -1), messages[-1].offset)
        log.warning(
            "a batch was refused for its data; replaying it one record at a time: %s",
            describe(exc),
            extra={"records": sum(len(m) for m in batch.values())},
        )

    async def _batch_one_by_one(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        """Decide a batch record by record; the first one refused for its data is set aside.

        Then _IsolatedError: the in-memory state may hold that record's effects, so the caller
        reloads state and rewinds; the replay skips the parked record.
        """
        for tp, messages in batch.items():
            for message in messages:
                try:
                    await self._batch({tp: [message]})
                except (*_DB_ERRORS, *_DATA_ERRORS) as exc:
                    if not is_data_error(exc):
                        raise
                    await self._park(message, reason=UNPROCESSABLE, detail=describe(exc))
                    raise _IsolatedError from exc
            if messages and self._isolate.get(tp, -1) <= messages[-1].offset:
                self._isolate.pop(tp, None)

    async def _park(self, message: ConsumerRecord, *, reason: str, detail: str) -> None:
        await self._set_aside(message, reason=reason, detail=detail)
        self._parked.add((message.topic, message.partition, message.offset))

    async def close(self) -> None:
        """Settle published events; persist liveness of held devices (exact offline restarts)."""
        await self._publisher.flush()
        async with self._lock:
            await self._commit_offsets()
            try:
                await self._flush_seen(list(self._states.values()))
            except (*_DB_ERRORS, store.StateConflictError) as exc:
                log.warning("could not persist device liveness at shutdown: %s", exc)

    # Rebalance ----------------------------------------------------------------------------

    async def on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Finish the batch in flight (the lock), persist liveness of the revoked devices."""
        async with self._lock:
            await self._commit_offsets()  # the next owner starts where this one wrote
            partitions = {tp.partition for tp in revoked}
            held = [s for s in self._states.values() if s.partition in partitions]
            try:
                await self._flush_seen(held)
            except (*_DB_ERRORS, store.StateConflictError) as exc:
                log.warning("could not persist liveness of revoked devices: %s", exc)
            log.info("partitions revoked", extra={"partitions": sorted(partitions)})

    async def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """Release partitions no longer owned, load state of the newly owned ones."""
        async with self._lock:
            self._generation += 1
            partitions = {tp.partition for tp in assigned if tp.topic in self._topics}
            self._release(self._owned - partitions)
            fresh = partitions - self._owned
            self._owned = partitions
            self._lagging = set(partitions)  # until a fetch shows them caught up
            self._isolate = {tp: o for tp, o in self._isolate.items() if tp in assigned}
            if fresh:
                await self._load(fresh)
                self._adopt_unheard(self._devices.values(), fresh)
            self._joined = True
            log.info(
                "partitions assigned",
                extra={"partitions": sorted(partitions), "devices": len(self._states)},
            )

    def _release(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        if not gone:
            return
        for device_id, state in list(self._states.items()):
            if state.partition in gone:
                for key in engine.forget_timers(state):
                    self._timers.cancel(key)
                del self._states[device_id]
        for partition in gone:
            self._deferred.pop(partition, None)
        self._metrics.devices.set(len(self._states))

    async def _load(self, partitions: Collection[int]) -> None:
        states = await store.load_states(self._pool, partitions=sorted(partitions))
        for state in states:
            self._states[state.device_id] = state
            self._schedule_restored(state)
        self._metrics.devices.set(len(self._states))

    def _partition_of(self, device_id: str) -> int | None:
        """The partition ingest's producer (murmur2, like the Java client) puts a device on."""
        partitions = self._consumer.partitions_for_topic(self._settings.topic_telemetry)
        if not partitions:
            return None
        return int(murmur2(device_id.encode()) & 0x7FFFFFFF) % len(partitions)

    def _adopt_unheard(self, devices: Iterable[Device], partitions: Collection[int]) -> None:
        """Start the offline clock of registry devices never heard from, from now.

        A provisioned device that never speaks gets device_offline after intervals x its
        reporting interval. The clock restarts at each assignment, so this can be late,
        never early; the state is persisted only when something happens.
        """
        now = self._clock()
        adopted = 0
        for device in devices:
            if device.device_id in self._states or not device.enabled:
                continue
            partition = self._partition_of(device.device_id)
            if partition is None or partition not in partitions:
                continue
            state = DeviceState(device.device_id, device.kind, partition, last_seen=now)
            state.persisted_seen = now  # nothing new to persist until it speaks
            self._states[device.device_id] = state
            profile = self._profile(device.device_id, device.kind)
            if profile.offline_after_s is not None:
                self._timers.schedule(
                    (OFFLINE, device.device_id, ""), now + profile.offline_after_s
                )
            adopted += 1
        if adopted:
            self._metrics.devices.set(len(self._states))
            log.info("watching registry devices not heard from yet", extra={"devices": adopted})

    def _schedule_restored(self, state: DeviceState) -> None:
        profile = self._profile(state.device_id, state.kind)
        silent_after = profile.offline_after_s
        if silent_after is not None and state.last_seen > 0:
            # the stored liveness may be up to half an interval old: never fire early
            slack = profile.interval_s / 2
            self._timers.schedule(
                (OFFLINE, state.device_id, ""), state.last_seen + silent_after + slack
            )
        for rule_id, pending in state.pending.items():
            rule = profile.by_id.get(rule_id)
            for_s = rule.for_s if rule is not None and rule.for_s is not None else 0.0
            self._timers.schedule((DURATION, state.device_id, rule_id), pending.since + for_s)
        for rule_id, ticket in state.open.items():
            self._timers.schedule((ESCALATE, state.device_id, rule_id), ticket.next_escalation_at())

    async def _rewind(self) -> None:
        # Not seek_to_committed(): it leaves a partition with no committed offset where it
        # is, which would skip the records of the batch that was just rolled back.
        self._uncommitted.clear()  # re-read from the committed offsets: set again as written
        for tp in self._consumer.assignment():
            if tp.topic not in self._topics:
                continue
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)  # auto_offset_reset=earliest
            else:
                self._consumer.seek(tp, committed)

    async def _recover(self, stop: asyncio.Event) -> None:
        """Drop in-memory state, reload it from the database and rewind to committed offsets."""
        backoff = 0.2
        while not stop.is_set():
            try:
                async with self._lock:
                    owned = set(self._owned)
                    self._release(owned)
                    await self._load(owned)
                    self._adopt_unheard(self._devices.values(), owned)
                    await self._rewind()
                    self._lagging = set(owned)
            except (*_DB_ERRORS, KafkaError) as exc:
                self._db_ok = False
                log.warning("reload failed, retrying: %s", exc, extra={"backoff_s": backoff})
                await _wait(stop, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            else:
                self._db_ok = True
                log.info("state reloaded", extra={"devices": len(self._states)})
                return

    # Profiles ------------------------------------------------------------------------------

    def _profile(self, device_id: str, kind: Kind) -> Profile:
        profile = self._profiles.get(device_id)
        if profile is not None and profile.kind is kind:
            return profile
        device = self._devices.get(device_id)
        if device is None or device.kind is not kind:
            # Not (yet) in the registry: the kind's defaults until a refresh knows better
            # (a refresh rebuilds the profile of every device this replica holds).
            self._registry_miss_at = self._registry_miss_at or self._clock()
            profile, _ = self._book.profile(
                kind=kind, interval_s=float(DEFAULT_REPORTING_INTERVAL_S[kind])
            )
            self._profiles[device_id] = profile
            return profile
        return self._build_profile(device)

    def _build_profile(self, device: Device) -> Profile:
        district = device.district or UNASSIGNED_DISTRICT
        profile, problems = self._book.profile(
            kind=device.kind,
            district=district,
            zone=device.zone,
            interval_s=float(device.interval_s),
            device_metadata=device.metadata,
            district_metadata=self._districts.get(district),
        )
        if problems:
            self._metrics.override_problems.inc(len(problems))
            log.warning(
                "ignored invalid rule overrides",
                extra={"device_id": device.device_id, "problems": problems[:10]},
            )
        self._profiles[device.device_id] = profile
        return profile

    async def _refresh_registry(self, *, full: bool = False) -> None:
        districts = await store.load_district_metadata(self._pool)
        districts_changed = districts != self._districts
        self._districts = districts
        devices = await load_devices(
            self._pool, changed_since=None if full else self._registry_seen
        )
        for device in devices:
            self._devices[device.device_id] = device
            if device.updated_at is not None and (
                self._registry_seen is None or device.updated_at > self._registry_seen
            ):
                self._registry_seen = device.updated_at
        changed = self._devices.values() if districts_changed else devices
        for device in changed:
            if device.device_id in self._profiles or device.device_id in self._states:
                profile = self._build_profile(device)
                state = self._states.get(device.device_id)
                if state is not None and profile.offline_after_s and state.last_seen > 0:
                    key = (OFFLINE, device.device_id, "")
                    if key in self._timers:
                        self._timers.schedule(key, state.last_seen + profile.offline_after_s)
        if self._owned and not full:
            self._adopt_unheard(devices, self._owned)
        self._registry_miss_at = 0.0
        if devices or districts_changed:
            log.info(
                "registry refreshed",
                extra={"devices_changed": len(devices), "districts_changed": districts_changed},
            )

    # The batch ------------------------------------------------------------------------------

    def _wait_s(self) -> float:
        deadline = self._timers.next_deadline()
        if deadline is None:
            return _MAX_WAIT_S
        return min(max(deadline - self._clock(), 0.0), _MAX_WAIT_S)

    async def _refresh_for_unknown(
        self, batch: Mapping[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        """Look up devices provisioned since the last refresh before deciding for them."""
        now = self._clock()
        if now - self._unknown_refresh_at < _UNKNOWN_REFRESH_S:
            return
        known = self._devices
        for messages in batch.values():
            for message in messages:
                key = message.key
                if key is not None and key.decode(errors="replace") not in known:
                    self._unknown_refresh_at = now
                    await self._refresh_registry()
                    return

    async def _batch(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        self._undecodable.clear()  # left over from a batch that failed
        await self._refresh_for_unknown(batch)
        fx = Effects()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        outcomes: Tally[tuple[str, str]] = Tally()
        oldest = float("inf")
        records = 0
        for tp, messages in batch.items():
            if not messages or tp.partition not in self._owned:
                continue
            status = tp.topic == self._settings.topic_status
            topic_label = "status" if status else "telemetry"
            for message in messages:
                outcome = self._apply(message, status=status, fx=fx)
                outcomes[(topic_label, outcome)] += 1
            records += len(messages)
            offsets[tp] = OffsetAndMetadata(messages[-1].offset + 1, "")
            oldest = min(oldest, messages[0].timestamp / 1000)
        await self._update_lag()
        if self._registry_miss_at and self._clock() - self._registry_miss_at > 5.0:
            await self._refresh_registry()
        self._fire_timers(self._clock(), fx)
        if offsets or fx.decisions or fx.dirty or fx.timers:
            await self._commit(fx, offsets)
        while self._undecodable:
            message, detail = self._undecodable[0]
            await self._park(message, reason=UNDECODABLE, detail=detail)
            self._undecodable.pop(0)
        for (topic, outcome), count in outcomes.items():
            self._metrics.events.labels(topic, outcome).inc(count)
        if records:
            self.processed += records
            self.batches += 1
            self._metrics.evaluations.inc(fx.evaluations)
            self._metrics.batch_size.observe(records)
            self._metrics.batch_duration.observe(time.perf_counter() - started)
            self._metrics.processing_latency.observe(max(self._clock() - oldest, 0.0))
        self._metrics.timers.set(len(self._timers))

    def _apply(self, message: ConsumerRecord, *, status: bool, fx: Effects) -> str:
        if self._parked and (message.topic, message.partition, message.offset) in self._parked:
            return "set_aside"  # replayed after a rewind; already dead-lettered
        try:
            if status:
                event = decode_status_observation(message.value, message.offset)
            else:
                obs = decode_observation(message.value)
        except BadRecordError as exc:
            self._undecodable.append((message, describe(exc)))  # set aside after the commit
            return "invalid"
        device_id, kind = (event.device_id, event.kind) if status else (obs.device_id, obs.kind)
        state = self._states.get(device_id)
        if state is None:
            state = DeviceState(device_id, kind, message.partition)
            self._states[device_id] = state
            fx.touch(state)
        profile = self._profile(device_id, kind)
        if status:
            seen = engine.on_status(state, profile, event, fx)
        else:
            seen = engine.on_reading(state, profile, obs, self._dark.is_dark, fx)
        if seen is not Seen.DUPLICATE and state.last_seen - state.persisted_seen >= (
            profile.interval_s / 2
        ):
            fx.touch(state)
        return seen.value

    async def _update_lag(self) -> None:
        lag: Tally[str] = Tally()
        lagging: set[int] = set()
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            position = await self._consumer.position(tp)
            behind = (highwater - position) if highwater is not None else 1
            lag[tp.topic] += max(behind, 0)
            if behind > _CAUGHT_UP_RECORDS:
                lagging.add(tp.partition)
        caught_up = self._lagging - lagging
        self._lagging = lagging
        now = self._clock()
        for partition in caught_up:
            for key in self._deferred.pop(partition, []):
                self._timers.schedule(key, now)
        self._metrics.consumer_lag.labels("telemetry").set(lag[self._settings.topic_telemetry])
        self._metrics.consumer_lag.labels("status").set(lag[self._settings.topic_status])

    def _fire_timers(self, now: float, fx: Effects) -> None:
        for key in self._timers.pop_due(now):
            timer, device_id, rule_id = key
            if timer == SYSTEM:
                fx.schedule(key, now)  # housekeeping runs after the commit
                continue
            state = self._states.get(device_id)
            if state is None:
                continue
            if state.partition in self._lagging:
                # Records of this device may still be queued: decide after catching up.
                self._deferred[state.partition].append(key)
                continue
            self._metrics.timers_fired.labels(timer).inc()
            profile = self._profile(device_id, state.kind)
            if timer == OFFLINE:
                engine.on_offline_due(state, profile, now, fx)
            elif timer == DURATION:
                engine.on_duration_due(
                    state, profile, rule_id, now=now, is_dark=self._dark.is_dark, fx=fx
                )
            elif timer == ESCALATE:
                engine.on_escalation_due(state, rule_id, now, fx)

    async def _commit(
        self, fx: Effects, offsets: Mapping[TopicPartition, OffsetAndMetadata]
    ) -> None:
        steps = engine.plan_steps(fx.decisions)
        dirty = list(fx.dirty.values())
        events = []
        changes: list[list[store.Change]] = []
        if dirty or steps:
            async with self._pool.acquire() as conn, conn.transaction():
                await store.save_states(conn, states=dirty)
                for step in steps:
                    step_changes = await store.apply_step(conn, step=step)
                    changes.append(step_changes)
                    events += await store.record_transitions(conn, changes=step_changes)
            store.mark_saved(dirty)
            self._db_ok = True
        for step, step_changes in zip(steps, changes, strict=True):
            self._learn(step, step_changes)
        housekeeping = []
        for key, deadline in fx.timers:
            if deadline is None:
                self._timers.cancel(key)
            elif key[0] == SYSTEM:
                housekeeping.append(key)
            else:
                self._timers.schedule(key, deadline)
        self._uncommitted.update(offsets)  # committed by _commit_offsets, after this write
        if events:
            try:
                await self._publisher.publish_soon(outbox_events(events))
            except (KafkaError, *_DB_ERRORS) as exc:
                self._metrics.errors.labels("kafka").inc()
                log.warning("ticket events stay in the outbox for the next sweep: %s", exc)
        for key in housekeeping:
            await self._housekeeping(key)

    async def _commit_offsets(self) -> None:
        """Commit the offsets of the batches written so far (partitions still assigned)."""
        self._committed_at = time.monotonic()
        assigned = self._consumer.assignment()
        offsets = {tp: o for tp, o in self._uncommitted.items() if tp in assigned}
        self._uncommitted.clear()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
            if self._parked:
                self._parked = {
                    (topic, partition, offset)
                    for topic, partition, offset in self._parked
                    if offset >= offsets.get(TopicPartition(topic, partition), _NONE).offset
                }
        except KafkaError as exc:  # CommitFailedError after a rebalance, or a broker error
            # The database already holds these batches; whoever reads them next replays them
            # harmlessly (seq guards, fenced state).
            self._metrics.errors.labels("kafka").inc()
            log.warning("offset commit failed: %s", exc)
            for tp, offset in offsets.items():
                self._uncommitted.setdefault(tp, offset)  # retried unless a newer one is due

    def _learn(self, step: engine.Step, changes: Sequence[store.Change]) -> None:
        """Update the open-ticket view from what the database did."""
        for change in changes:
            row = change.ticket
            state = self._states.get(row["device_id"])
            rule, priority = row["rule"], row["priority"]
            if change.action == "opened":
                self._metrics.tickets_opened.labels(rule, priority).inc()
            elif change.action == "occurrence":
                raised = step.raises.get((row["device_id"], rule))
                self._metrics.occurrences.labels(rule).inc(raised[1] if raised else 1)
            elif change.action == "auto_resolved":
                self._metrics.tickets_resolved.labels(rule, priority).inc()
            elif change.action == "escalated":
                self._metrics.tickets_escalated.labels(rule, priority).inc()
            if state is None:
                continue
            if change.action == "auto_resolved":
                ticket = state.open.get(rule)
                if ticket is not None and ticket.ticket_id in {None, row["id"]}:
                    del state.open[rule]
                continue
            ticket = OpenTicket(
                ticket_id=row["id"],
                priority=Priority(priority),
                opened_at=row["opened_at"].timestamp(),
                due_at=row["due_at"].timestamp(),
                escalations=row["escalations"],
            )
            state.open[rule] = ticket
            self._timers.schedule((ESCALATE, state.device_id, rule), ticket.next_escalation_at())
        escalated = {c.ticket["id"] for c in changes if c.action == "escalated"}
        for decision in step.escalations.values():
            if decision.ticket_id not in escalated:
                self._forget_ticket(decision)

    def _forget_ticket(self, decision: Escalate) -> None:
        # Resolved by an operator (or escalated elsewhere): no longer ours to escalate.
        state = self._states.get(decision.device_id)
        ticket = state.open.get(decision.rule_id) if state else None
        if state is not None and ticket is not None and ticket.ticket_id == decision.ticket_id:
            del state.open[decision.rule_id]
            self._timers.cancel((ESCALATE, decision.device_id, decision.rule_id))

    async def _housekeeping(self, key: TimerKey) -> None:
        now = self._clock()
        try:
            if key == _REGISTRY:
                await self._refresh_registry()
            elif key == _GAUGE:
                counts = await store.open_ticket_counts(self._pool)
                self._metrics.open_tickets.clear()
                for (district, priority), count in counts.items():
                    self._metrics.open_tickets.labels(district, priority).set(count)
            elif key == _SWEEP:
                await self._publisher.sweep(older_than_s=self._settings.rules_outbox_sweep_s)
        except (KafkaError, *_DB_ERRORS) as exc:
            log.warning("housekeeping %s failed: %s", key[1], exc)
        period = {
            _REGISTRY: self._settings.rules_registry_refresh_s,
            _GAUGE: self._settings.rules_gauge_refresh_s,
            _SWEEP: self._settings.rules_outbox_sweep_s,
        }[key]
        self._timers.schedule(key, now + period)

    async def _flush_seen(self, states: Sequence[DeviceState]) -> None:
        stale = [s for s in states if s.last_seen > s.persisted_seen]
        if not stale:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await store.save_states(conn, states=stale)
        store.mark_saved(stale)
        log.info("persisted device liveness", extra={"devices": len(stale)})


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Back off for `seconds`, returning early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
