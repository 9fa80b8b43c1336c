"""Server-Sent Events fan-out: state changes, connectivity and ticket events from Kafka.

Every API replica must see every event, so the stream reads Kafka without a consumer group
(from the latest offsets), and only while at least one client is connected: with no client
it costs nothing. Every live client shares that one consumer.

A client that sends `Last-Event-ID` (the Kafka timestamp in ms of the last event it saw)
joins the shared feed at once, with its live events held back, and gets a replay: a private
consumer reads each partition from that time up to the offset where the client's live feed
began (a window fixed when it joined, at most CITYOPS_API_STREAM_RESUME_MAX_EVENTS records,
else 410), then stops; the held events follow and the client is live. No gap and no
duplicate at the seam; events of the Last-Event-ID millisecond itself are sent again
(at-least-once). At most CITYOPS_API_STREAM_RESUME_MAX replays run at once (503 with
Retry-After beyond). Every consumer is owned by a task whose `finally` stops it, so a client
that leaves, even mid-replay, releases it (issue 12 row 4: one consumer leaked per resume).

A client that cannot keep up is disconnected (it may reconnect with Last-Event-ID) rather
than slowing everyone else. A record that does not decode is skipped and counted; it never
ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from cityops.api.metrics import ApiMetrics
from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.common.memory import release_memory

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
    """One connected client: its filter and a bounded queue (None = end of stream).

    While a resume replays, live events wait in `held` (bounded like the queue); `live_from`
    is where in each partition the client's live feed began (the replay ends there).
    """

    filter: StreamFilter
    queue: asyncio.Queue[StreamEvent | None]
    overflowed: bool = False
    held: deque[StreamEvent] | None = None
    live_from: asyncio.Future[dict[TopicPartition, int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True)
class EventDecoder:
    """Turns Kafka records into stream events; keeps the newest seq per device and districts."""

    telemetry_topic: str
    status_topic: str
    tickets_topic: str
    devices_topic: str
    districts: dict[str, str] = field(default_factory=dict)
    newest_seq: dict[str, int] = field(default_factory=dict)
    on_skip: Callable[[str], None] = lambda _: None  # told the topic kind of a skipped record

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
        """The stream event of a record, or None (not a change, a registry update, or a record
        that does not decode: skipped and reported to `on_skip`, never raised)."""
        if record.value is None:
            return None
        try:
            body = orjson.loads(record.value)
            return self._decode(record.topic, record.timestamp, body)
        except Exception as exc:  # a poison record must not end the stream
            topic_kind = self._topic_kind(record.topic)
            log.warning(  # rate-limited per template by the service's log filter
                "stream skipped an undecodable %s record: %r",
                topic_kind,
                exc,
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
            self.on_skip(topic_kind)
            return None

    def _topic_kind(self, topic: str) -> str:
        kinds = {
            self.telemetry_topic: "telemetry",
            self.status_topic: "status",
            self.tickets_topic: "tickets",
            self.devices_topic: "devices",
        }
        return kinds.get(topic, "other")

    def _decode(self, topic: str, timestamp: int, body: Any) -> StreamEvent | None:
        if topic == self.devices_topic:
            self.districts[str(body["device_id"])] = str(body["district"])
            return None
        if topic == self.tickets_topic:
            return StreamEvent(
                timestamp, "ticket", str(body["kind"]), str(body["district"]), _json(body)
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
            return StreamEvent(timestamp, "state", str(body["kind"]), district, _json(data))
        data = {
            "device_id": device_id,
            "kind": body["kind"],
            "district": district,
            "online": bool(body["online"]),
            "at": body.get("received_at"),
        }
        return StreamEvent(timestamp, "connectivity", str(body["kind"]), district, _json(data))


def _json(document: Any) -> bytes:
    """`document` as JSON in a bytes object of its own size.

    orjson's result keeps the ~4 KiB buffer it was written into (measured with tracemalloc:
    10,000 small documents held 41 MB, their copies 0.7 MB); events wait in up to
    CITYOPS_API_STREAM_QUEUE_MAX-long queues per client, so they are copied once.
    """
    return bytes(memoryview(orjson.dumps(document)))


def _end(subscription: Subscription) -> None:
    """Queue end-of-stream, making room for it if the queue is full."""
    if subscription.queue.full():
        subscription.queue.get_nowait()
    subscription.queue.put_nowait(None)


def _settle(window: asyncio.Future[None], outcome: Exception | None) -> None:
    """Resolve a resume's window check once (later outcomes are ignored)."""
    if window.done():
        return
    if outcome is None:
        window.set_result(None)
    else:
        window.set_exception(outcome)


class ResumeRefusedError(Exception):
    """A resume that cannot start: `reason` busy | window | unavailable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


RELEASE_AFTER_S = 2.0

# A replay reads only its window: small fetches keep a burst of resumes from buffering
# megabytes per consumer (aiokafka's defaults: 1 MiB per partition, 50 MiB per fetch).
_REPLAY_FETCH = {"max_partition_fetch_bytes": 256 * 1024, "fetch_max_bytes": 4 * 1024 * 1024}


class Broadcaster:
    """Runs a group-less consumer while clients are connected and fans events out to them;
    replays the window a resuming client missed (see the module docstring)."""

    def __init__(
        self,
        *,
        access: KafkaAccess,
        topics: Mapping[str, str],
        pool: asyncpg.Pool,
        metrics: ApiMetrics,
        queue_max: int,
        fetch_max_wait_ms: int = 25,
        resume_max: int = 16,
        resume_max_events: int = 200_000,
        start_timeout_s: float = 15.0,
    ) -> None:
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._access = access
        self._topics = dict(topics)
        self._pool = pool
        self._metrics = metrics
        self._queue_max = queue_max
        self._resume_max = resume_max
        self._resume_max_events = resume_max_events
        self._start_timeout_s = start_timeout_s
        self._subscribers: set[Subscription] = set()
        self._replays: dict[Subscription, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every task until it has ended
        self._task: asyncio.Task[None] | None = None
        self._release: asyncio.TimerHandle | None = None  # memory back once resumes are over
        self._positions: dict[TopicPartition, int] = {}  # where the shared feed has delivered
        self._districts: dict[str, str] = {}
        self._closed = False
        self.live = asyncio.Event()  # set once the shared consumer has its partitions
        # every label exists from start-up at 0, so an alert's increase() sees the first one
        for topic_kind in ("telemetry", "status", "tickets", "devices"):
            metrics.stream_skipped.labels(topic_kind)
        for reason in ("busy", "window", "unavailable"):
            metrics.stream_resumes_refused.labels(reason)

    @property
    def resumes(self) -> int:
        """Replays in progress (each holds a consumer)."""
        return len(self._replays)

    def _decoder(self) -> EventDecoder:
        skipped = self._metrics.stream_skipped
        return EventDecoder(
            telemetry_topic=self._topics["telemetry"],
            status_topic=self._topics["status"],
            tickets_topic=self._topics["tickets"],
            devices_topic=self._topics["devices"],
            districts=self._districts,
            on_skip=lambda topic_kind: skipped.labels(topic_kind).inc(),
        )

    def _release_when_idle(self) -> None:
        """Once no replay has run for `RELEASE_AFTER_S`, give their memory back (see
        `release_memory`): a wave of resumes otherwise leaves RSS at its peak."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._replays or self._closed:
            return

        def release() -> None:
            self._release = None
            if not self._replays:
                release_memory()

        self._release = asyncio.get_running_loop().call_later(RELEASE_AFTER_S, release)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def open(self, stream_filter: StreamFilter, *, since_ms: int | None) -> Subscription:
        """Register a client (live at once, or after a replay from `since_ms`).

        The caller must `leave()` it. ResumeRefusedError when a resume cannot start.
        """
        subscription = Subscription(stream_filter, asyncio.Queue(self._queue_max))
        if self._closed:
            subscription.queue.put_nowait(None)
            return subscription
        if since_ms is not None and len(self._replays) >= self._resume_max:
            self._metrics.stream_resumes_refused.labels("busy").inc()
            raise ResumeRefusedError(
                "busy", f"{self._resume_max} resumes are replaying; retry shortly"
            )
        if since_ms is not None:
            subscription.held = deque()
        self._join(subscription)
        if since_ms is None:
            return subscription
        window: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._replays[subscription] = self._spawn(
            self._replay(subscription, since_ms, window), "stream-resume"
        )
        self._metrics.stream_resumes.set(len(self._replays))
        try:
            await asyncio.wait_for(asyncio.shield(window), self._start_timeout_s)
        except TimeoutError:
            self.leave(subscription)
            self._metrics.stream_resumes_refused.labels("unavailable").inc()
            raise ResumeRefusedError("unavailable", "the stream cannot read Kafka now") from None
        except BaseException:
            self.leave(subscription)
            raise
        finally:
            if not window.done():
                window.cancel()
        return subscription

    def _join(self, subscription: Subscription) -> None:
        self._subscribers.add(subscription)
        self._metrics.stream_clients.set(len(self._subscribers))
        if self.live.is_set():
            subscription.live_from.set_result(dict(self._positions))
        if self._task is None or self._task.done():
            self.live.clear()
            self._task = self._spawn(self._run_shared(), "stream-consumer")
            self._task.add_done_callback(self._shared_ended)

    def leave(self, subscription: Subscription) -> None:
        """Unregister a client (idempotent).

        Its replay (if any) and, with nobody left, the shared consumer are cancelled and stop
        their consumers in their own `finally`: nothing is awaited here, so a client that
        leaves cannot interrupt the release.
        """
        self._subscribers.discard(subscription)
        self._metrics.stream_clients.set(len(self._subscribers))
        replay = self._replays.pop(subscription, None)
        if replay is not None:
            replay.cancel()
            self._metrics.stream_resumes.set(len(self._replays))
        if not subscription.live_from.done():
            subscription.live_from.cancel()
        if not self._subscribers and self._task is not None:
            self._task.cancel()
            self._task = None
            self.live.clear()

    def _shared_ended(self, task: asyncio.Task[None]) -> None:
        """The shared consumer ended without being cancelled: its clients' streams end too
        (they reconnect with Last-Event-ID), and the next client starts a new one."""
        if task.cancelled():
            return
        log.error("stream consumer ended: %r", task.exception())
        if self._task is task:
            self._task = None
        for subscription in list(self._subscribers):
            _end(subscription)

    def _deliver(self, targets: Collection[Subscription], event: StreamEvent) -> None:
        for subscription in targets:
            if subscription.overflowed or not subscription.filter.matches(event):
                continue
            held = subscription.held
            if held is None and not subscription.queue.full():
                subscription.queue.put_nowait(event)
                self._metrics.stream_events.labels(event.event_type).inc()
            elif held is not None and len(held) < self._queue_max:
                held.append(event)  # counted when the replay releases it
            else:
                # A slow client: end its stream; it may reconnect with Last-Event-ID.
                subscription.overflowed = True
                self._metrics.stream_dropped.inc()
                _end(subscription)

    async def _load_districts(self) -> None:
        rows = await self._pool.fetch("SELECT device_id, district FROM devices")
        self._districts.update((row["device_id"], row["district"]) for row in rows)

    async def _run_shared(self) -> None:
        await self._load_districts()
        consumer = kafka_consumer(
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
        try:
            await consumer.start()
            assignment = consumer.assignment()
            while not assignment:
                await consumer.getmany(timeout_ms=100)
                assignment = consumer.assignment()
            # Pin the start at "latest now", so an event right after subscribing is not missed
            # and a resume knows where its live feed begins.
            self._positions = {tp: await consumer.position(tp) for tp in assignment}
            for subscription in self._subscribers:
                if not subscription.live_from.done():
                    subscription.live_from.set_result(dict(self._positions))
            self.live.set()
            await self._consume_shared(consumer, self._decoder())
        finally:
            if self._task in (None, asyncio.current_task()):  # not a newer consumer's flag
                self.live.clear()
            await consumer.stop()

    async def _consume_shared(self, consumer: AIOKafkaConsumer, decoder: EventDecoder) -> None:
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=1000, max_records=2000)
            except KafkaError as exc:
                log.warning("stream consumer fetch failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if not fetched:
                continue
            clients = list(self._subscribers)
            interest = Interest.of([c.filter for c in clients])
            for tp, records in fetched.items():
                for record in records:
                    if not decoder.wanted(record, interest):
                        continue
                    event = decoder.decode(record)
                    if event is not None:
                        self._deliver(clients, event)
                # no await since the deliveries: a client joining now starts exactly here
                self._positions[tp] = records[-1].offset + 1

    async def _replay(
        self, subscription: Subscription, since_ms: int, window: asyncio.Future[None]
    ) -> None:
        """Send a resumed client what it missed, then make it live (see the module doc)."""
        unavailable = ResumeRefusedError("unavailable", "the stream cannot read Kafka now")
        try:
            live_from = await subscription.live_from
            consumer = kafka_consumer(
                self._access, group_id=None, enable_auto_commit=False, **_REPLAY_FETCH
            )
            try:
                await consumer.start()
                ranges = await self._replay_window(consumer, since_ms, live_from)
                records = sum(end - start for start, end in ranges.values())
                if records > self._resume_max_events:
                    self._metrics.stream_resumes_refused.labels("window").inc()
                    _settle(
                        window,
                        ResumeRefusedError(
                            "window",
                            f"{records} records since Last-Event-ID; a resume replays at most"
                            f" {self._resume_max_events}: reconnect without Last-Event-ID",
                        ),
                    )
                    return
                _settle(window, None)
                await self._read_window(consumer, subscription, ranges)
            finally:
                await consumer.stop()
            await self._release_held(subscription)
        except KafkaError as exc:
            log.warning("stream resume failed: %s", exc)
            if window.done():
                _end(subscription)  # mid-replay: the client reconnects with Last-Event-ID
            else:
                self._metrics.stream_resumes_refused.labels("unavailable").inc()
        except Exception:
            # a bug here must end this client's stream, not leave it waiting forever
            log.exception("stream resume failed")
            _end(subscription)
        finally:
            _settle(window, unavailable)
            if self._replays.get(subscription) is asyncio.current_task():
                del self._replays[subscription]
                self._metrics.stream_resumes.set(len(self._replays))
            self._release_when_idle()

    async def _replay_window(
        self,
        consumer: AIOKafkaConsumer,
        since_ms: int,
        live_from: Mapping[TopicPartition, int],
    ) -> dict[TopicPartition, tuple[int, int]]:
        """[first offset at or after `since_ms`, where the live feed began) per partition."""
        found = await consumer.offsets_for_times(dict.fromkeys(live_from, since_ms))
        ranges = {}
        for tp, end in live_from.items():
            start = found[tp].offset if found.get(tp) is not None else end
            if start < end:
                ranges[tp] = (start, end)
        return ranges

    async def _read_window(
        self,
        consumer: AIOKafkaConsumer,
        subscription: Subscription,
        ranges: Mapping[TopicPartition, tuple[int, int]],
    ) -> None:
        """Queue the window's events at the client's pace (a full queue waits, not drops)."""
        if not ranges:
            return
        consumer.assign(list(ranges))
        for tp, (start, _) in ranges.items():
            consumer.seek(tp, start)
        ends = {tp: end for tp, (_, end) in ranges.items()}
        decoder = self._decoder()
        while ends and not subscription.overflowed:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=500)
            for tp, records in fetched.items():
                end = ends.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:
                        break
                    event = decoder.decode(record)
                    if event is not None and subscription.filter.matches(event):
                        await subscription.queue.put(event)
                        self._metrics.stream_events.labels(event.event_type).inc()
            for tp in list(ends):
                if await consumer.position(tp) >= ends[tp]:
                    del ends[tp]
                    consumer.pause(tp)
            # Neither a buffered fetch nor a queue with room suspends: let the loop serve
            # others between batches, so a burst of replays cannot starve it.
            await asyncio.sleep(0)

    async def _release_held(self, subscription: Subscription) -> None:
        """Queue the live events held during the replay, then deliver live directly."""
        held = subscription.held
        while held and not subscription.overflowed:
            event = held.popleft()
            await subscription.queue.put(event)
            self._metrics.stream_events.labels(event.event_type).inc()
        subscription.held = None

    async def close(self) -> None:
        """End every stream (shutdown): clients get end-of-stream, consumers stop."""
        self._closed = True
        if self._release is not None:
            self._release.cancel()
            self._release = None
        for subscription in list(self._subscribers):
            _end(subscription)
            self.leave(subscription)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
