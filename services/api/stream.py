"""Server-Sent Events fan-out: state changes, connectivity and ticket events from Kafka.

Every API replica must see every event, so the stream reads Kafka without a consumer group
(from the latest offsets), and only while at least one client is connected: with no client
it costs nothing. A client that sends `Last-Event-ID` (the Kafka timestamp in ms of the last
event it saw) gets a private consumer that seeks every partition to that time, so it resumes
without a gap as long as Kafka still holds the records (events of that same millisecond are
sent again: at-least-once). A client that cannot keep up is
disconnected (it may reconnect with Last-Event-ID) rather than slowing everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from cityops.api.metrics import ApiMetrics
from cityops.common.kafka import KafkaAccess, kafka_consumer

log = logging.getLogger(__name__)

_TELEMETRY_META = frozenset({"received_at", "ingest_id"})
_MAX_DISTRICT_CACHE = 1_000_000


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event: id (Kafka timestamp, ms), type, filter keys and JSON data."""

    event_id: int
    event_type: str
    kind: str
    district: str
    data: bytes

    def render(self) -> bytes:
        """The event in text/event-stream framing."""
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (
            self.event_id,
            self.event_type.encode(),
            self.data,
        )


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which events a client wants; empty sets mean everything."""

    kinds: frozenset[str] = frozenset()
    districts: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    def matches(self, event: StreamEvent) -> bool:
        """Whether `event` passes the filter."""
        return (
            (not self.kinds or event.kind in self.kinds)
            and (not self.districts or event.district in self.districts)
            and (not self.types or event.event_type in self.types)
        )


@dataclass(frozen=True, slots=True)
class Interest:
    """What any of the connected clients could want (None = anything), to skip records early."""

    types: frozenset[str] | None
    districts: frozenset[str] | None

    @classmethod
    def of(cls, filters: Collection[StreamFilter]) -> Interest:
        """The union of the clients' filters."""
        types: set[str] = set()
        districts: set[str] = set()
        any_type = any_district = not filters
        for f in filters:
            any_type = any_type or not f.types
            any_district = any_district or not f.districts
            types |= f.types
            districts |= f.districts
        return cls(
            None if any_type else frozenset(types), None if any_district else frozenset(districts)
        )


@dataclass(slots=True, eq=False)  # identity semantics: kept in sets
class Subscription:
    """One connected client: its filter and a bounded queue (None = end of stream)."""

    filter: StreamFilter
    queue: asyncio.Queue[StreamEvent | None]
    overflowed: bool = False


@dataclass(slots=True)
class EventDecoder:
    """Turns Kafka records into stream events; keeps the newest seq per device and districts."""

    telemetry_topic: str
    status_topic: str
    tickets_topic: str
    devices_topic: str
    districts: dict[str, str] = field(default_factory=dict)
    newest_seq: dict[str, int] = field(default_factory=dict)

    def wanted(self, record: ConsumerRecord[bytes, bytes], interest: Interest) -> bool:
        """Whether a state/connectivity record can interest anyone, judged by topic and key only.

        Decoding every reading of the city for a client that follows one district was most of
        the stream's cost; the key (device_id) gives the district without parsing the value.
        """
        if record.topic == self.telemetry_topic:
            event_type = "state"
        elif record.topic == self.status_topic:
            event_type = "connectivity"
        else:
            return True  # tickets carry their district in the value; devices feed the map
        if interest.types is not None and event_type not in interest.types:
            return False
        if interest.districts is None or record.key is None:
            return True
        district = self.districts.get(record.key.decode(errors="replace"), "unassigned")
        return district in interest.districts

    def decode(self, record: ConsumerRecord[bytes, bytes]) -> StreamEvent | None:
        """The stream event of a record, or None (not a change, or a registry update)."""
        if record.value is None:
            return None
        try:
            body = orjson.loads(record.value)
            return self._decode(record.topic, record.timestamp, body)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.debug("stream skipped an undecodable record: %s", exc)
            return None

    def _decode(self, topic: str, timestamp: int, body: Any) -> StreamEvent | None:
        if topic == self.devices_topic:
            self.districts[str(body["device_id"])] = str(body["district"])
            return None
        if topic == self.tickets_topic:
            return StreamEvent(
                timestamp, "ticket", str(body["kind"]), str(body["district"]), orjson.dumps(body)
            )
        device_id = str(body["device_id"])
        district = self.districts.get(device_id, "unassigned")
        if topic == self.telemetry_topic:
            seq = int(body["seq"])
            if seq <= self.newest_seq.get(device_id, -1):
                return None  # a replay or an out-of-order reading is not a state change
            if len(self.newest_seq) >= _MAX_DISTRICT_CACHE:
                self.newest_seq.clear()
            self.newest_seq[device_id] = seq
            values = {
                k: v
                for k, v in body.items()
                if k not in _TELEMETRY_META and k not in {"device_id", "kind", "seq", "ts"}
            }
            data = {
                "device_id": device_id,
                "kind": body["kind"],
                "district": district,
                "seq": seq,
                "ts": body["ts"],
                "values": values,
            }
            return StreamEvent(timestamp, "state", str(body["kind"]), district, orjson.dumps(data))
        data = {
            "device_id": device_id,
            "kind": body["kind"],
            "district": district,
            "online": bool(body["online"]),
            "at": body.get("received_at"),
        }
        return StreamEvent(
            timestamp, "connectivity", str(body["kind"]), district, orjson.dumps(data)
        )


def _end(subscription: Subscription) -> None:
    """Queue end-of-stream, making room for it if the queue is full."""
    if subscription.queue.full():
        subscription.queue.get_nowait()
    subscription.queue.put_nowait(None)


class Broadcaster:
    """Runs a group-less consumer while clients are connected and fans events out to them."""

    def __init__(
        self,
        *,
        access: KafkaAccess,
        topics: Mapping[str, str],
        pool: asyncpg.Pool,
        metrics: ApiMetrics,
        queue_max: int,
        fetch_max_wait_ms: int = 25,
    ) -> None:
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._access = access
        self._topics = dict(topics)
        self._pool = pool
        self._metrics = metrics
        self._queue_max = queue_max
        self._subscribers: set[Subscription] = set()
        self._everyone: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._districts: dict[str, str] = {}
        self._closed = False
        self.live = asyncio.Event()  # set once the shared consumer has its partitions

    def _decoder(self) -> EventDecoder:
        return EventDecoder(
            telemetry_topic=self._topics["telemetry"],
            status_topic=self._topics["status"],
            tickets_topic=self._topics["tickets"],
            devices_topic=self._topics["devices"],
            districts=self._districts,
        )

    def _consumer(self) -> AIOKafkaConsumer:
        return kafka_consumer(
            self._access,
            *self._topics.values(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            # Every fetch names all partitions of four topics, encoded and decoded in Python:
            # letting the broker gather records for a moment (invisible on a dashboard) makes
            # the fetches a few times rarer.
            fetch_min_bytes=256 * 1024,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
        )

    async def _load_districts(self) -> None:
        rows = await self._pool.fetch("SELECT device_id, district FROM devices")
        self._districts.update((row["device_id"], row["district"]) for row in rows)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, stream_filter: StreamFilter, *, since_ms: int | None = None
    ) -> AsyncIterator[Subscription]:
        """Register a client for the life of the context."""
        subscription = Subscription(stream_filter, asyncio.Queue(self._queue_max))
        if self._closed:
            subscription.queue.put_nowait(None)
            yield subscription
            return
        private: asyncio.Task[None] | None = None
        self._everyone.add(subscription)
        if since_ms is None:
            self._subscribers.add(subscription)
            self._metrics.stream_clients.set(len(self._subscribers))
            if self._task is None or self._task.done():
                self.live.clear()
                self._task = asyncio.create_task(self._run_shared(), name="stream-consumer")
        else:
            private = asyncio.create_task(
                self._run_private(subscription, since_ms), name="stream-resume"
            )
        try:
            yield subscription
        finally:
            if private is not None:
                private.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await private
            self._subscribers.discard(subscription)
            self._everyone.discard(subscription)
            self._metrics.stream_clients.set(len(self._subscribers))
            if not self._subscribers and self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None

    def _deliver(self, targets: Collection[Subscription], event: StreamEvent) -> None:
        for subscription in targets:
            if subscription.overflowed or not subscription.filter.matches(event):
                continue
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                # A slow client: end its stream; it may reconnect with Last-Event-ID.
                subscription.overflowed = True
                self._metrics.stream_dropped.inc()
                _end(subscription)
                continue
            self._metrics.stream_events.labels(event.event_type).inc()

    async def _consume(
        self,
        consumer: AIOKafkaConsumer,
        decoder: EventDecoder,
        targets: Callable[[], Collection[Subscription]],
    ) -> None:
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=1000, max_records=2000)
            except KafkaError as exc:
                log.warning("stream consumer fetch failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if not fetched:
                continue
            clients = targets()
            interest = Interest.of([c.filter for c in clients])
            for records in fetched.values():
                for record in records:
                    if not decoder.wanted(record, interest):
                        continue
                    event = decoder.decode(record)
                    if event is not None:
                        self._deliver(clients, event)

    @contextlib.asynccontextmanager
    async def _assigned_consumer(
        self,
    ) -> AsyncIterator[tuple[AIOKafkaConsumer, frozenset[TopicPartition]]]:
        """A started group-less consumer once it holds its partitions (stopped on exit)."""
        await self._load_districts()
        consumer = self._consumer()
        await consumer.start()
        try:
            assignment = consumer.assignment()
            while not assignment:
                await consumer.getmany(timeout_ms=100)
                assignment = consumer.assignment()
            yield consumer, frozenset(assignment)
        finally:
            await consumer.stop()

    async def _run_shared(self) -> None:
        try:
            async with self._assigned_consumer() as (consumer, assignment):
                # Pin the start at "latest now", so an event right after subscribing is not
                # missed.
                for tp in assignment:
                    await consumer.position(tp)
                self.live.set()
                await self._consume(consumer, self._decoder(), lambda: list(self._subscribers))
        finally:
            self.live.clear()

    async def _run_private(self, subscription: Subscription, since_ms: int) -> None:
        async with self._assigned_consumer() as (consumer, assignment):
            # Resume at the millisecond of the last event the client saw: events of that same
            # millisecond are sent again (at-least-once), none is skipped.
            offsets = await consumer.offsets_for_times(dict.fromkeys(assignment, since_ms))
            ends = await consumer.end_offsets(list(assignment))
            for tp in assignment:
                found = offsets.get(tp)
                consumer.seek(tp, found.offset if found is not None else ends[tp])
            await self._consume(consumer, self._decoder(), lambda: [subscription])

    async def close(self) -> None:
        """End every stream (shutdown): clients get end-of-stream, the consumer stops."""
        self._closed = True
        for subscription in list(self._everyone):
            _end(subscription)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
