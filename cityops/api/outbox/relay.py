"""The API's Kafka events, through a transactional outbox (table `api_outbox`).

Registry changes (city.devices.v1) and operator ticket transitions (city.tickets.v1) are
written to the outbox in the same transaction as the change. After the commit the route wakes
the relay, which produces the outbox in id order (acks=all, idempotent producer) and deletes
the rows Kafka acknowledged. A failed produce leaves the rows where they are; the relay retries
with a backoff and sweeps the whole outbox every `sweep_interval_s`, so rows a crashed replica
left behind are published by whichever replica sweeps next. Replicas take turns under an
advisory lock. Delivery is at-least-once: a crash between Kafka's ack and the delete publishes
a row again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from cityops.api.db import Conn
from cityops.api.devices import store as store_devices
from cityops.api.metrics import ApiMetrics
from cityops.api.outbox import store as store_outbox
from cityops.api.outbox.store import OutboxEvent
from cityops.common.tickets import TicketEvent

log = logging.getLogger(__name__)

RELAY_BATCH = 1000
# What a relay attempt may fail with; the events stay in the outbox for the next attempt.
RELAY_ERRORS: tuple[type[BaseException], ...] = (
    KafkaError,
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def device_document(row: Any) -> dict[str, Any]:
    """The registry JSON of one device as published on city.devices.v1."""
    metadata = row["metadata"]
    return {
        "device_id": row["device_id"],
        "kind": row["kind"],
        "district": row["district"],
        "zone": row["zone"],
        "lat": row["lat"],
        "lon": row["lon"],
        "reporting_interval_s": row["reporting_interval_s"],
        "metadata": orjson.loads(metadata) if isinstance(metadata, str) else metadata,
        "enabled": row["enabled"],
        "updated_at": row["updated_at"].isoformat() if row["updated_at"] else None,
    }


def device_events(rows: Iterable[Any], *, topic: str) -> list[OutboxEvent]:
    """One city.devices.v1 record per registry row (key = device_id), in device_id order."""
    return [
        OutboxEvent(topic, row["device_id"], orjson.dumps(device_document(row)))
        for row in sorted(rows, key=lambda row: str(row["device_id"]))
    ]


def tombstone_event(device_id: str, *, topic: str) -> OutboxEvent:
    """The record that makes compaction forget a deleted device."""
    return OutboxEvent(topic, device_id, None)


def ticket_event(event: TicketEvent, *, topic: str) -> OutboxEvent:
    """The city.tickets.v1 record of one transition (key = device_id)."""
    return OutboxEvent(topic, event.device_id, event.model_dump_json().encode())


def next_backoff(previous_s: float, *, cap_s: float) -> float:
    """Delay before retrying after a failed relay: 1 s, doubling, at most `cap_s`."""
    return min(max(previous_s * 2, 1.0), cap_s)


class EventPublisher:
    """Writes events to the outbox inside the caller's transaction and relays them to Kafka."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
        metrics: ApiMetrics,
        devices_topic: str,
        tickets_topic: str,
        publish_timeout_s: float,
        sweep_interval_s: float,
        batch_max: int = RELAY_BATCH,
    ) -> None:
        self._producer = producer
        self._pool = pool
        self._metrics = metrics
        self._devices_topic = devices_topic
        self._tickets_topic = tickets_topic
        self._publish_timeout_s = publish_timeout_s
        self._sweep_interval_s = sweep_interval_s
        self._batch_max = batch_max
        self._wake = asyncio.Event()

    # In the change's transaction -----------------------------------------------------------

    async def devices_changed(self, conn: Conn, *, device_ids: Sequence[str]) -> None:
        """Queue the current registry row of each device (read in the caller's transaction)."""
        if not device_ids:
            return
        rows = await store_devices.registry_rows(conn, device_ids=device_ids)
        await store_outbox.append(conn, events=device_events(rows, topic=self._devices_topic))

    async def device_deleted(self, conn: Conn, *, device_id: str) -> None:
        """Queue the tombstone of a deleted device."""
        event = tombstone_event(device_id, topic=self._devices_topic)
        await store_outbox.append(conn, events=[event])

    async def ticket_transition(self, conn: Conn, event: TicketEvent) -> None:
        """Queue one operator ticket transition."""
        await store_outbox.append(conn, events=[ticket_event(event, topic=self._tickets_topic)])

    # After the commit ----------------------------------------------------------------------

    def committed(self) -> None:
        """Wake the relay: the caller committed events (never blocks, never raises)."""
        self._wake.set()

    async def relay(self) -> int:
        """Produce the outbox in id order and delete what Kafka acknowledged; errors propagate.

        Batches of `batch_max` rows, each in one transaction under the relay lock (another
        replica relaying makes this wait, then finds the rows gone). Returns the events
        published.
        """
        relayed = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                await store_outbox.lock_relay(conn)
                stored = await store_outbox.oldest(conn, limit=self._batch_max)
                if not stored:
                    return relayed
                events = [s.event for s in stored]
                try:
                    await self._produce(events)
                except RELAY_ERRORS:
                    for topic, count in Counter(e.topic for e in events).items():
                        self._metrics.outbox_failed.labels(topic).inc(count)
                    raise
                for topic, count in Counter(e.topic for e in events).items():
                    self._metrics.outbox_published.labels(topic).inc(count)
                await store_outbox.delete(conn, ids=[s.id for s in stored])
            relayed += len(stored)
            if len(stored) < self._batch_max:
                return relayed

    async def _produce(self, events: Sequence[OutboxEvent]) -> None:
        # Bounded: with Kafka down aiokafka would wait up to its request timeout (40 s) while
        # this transaction holds the relay lock.
        async with asyncio.timeout(self._publish_timeout_s):
            acks = [
                await self._producer.send(e.topic, key=e.key.encode(), value=e.payload)
                for e in events
            ]
            await asyncio.gather(*acks)

    async def refresh_backlog(self) -> None:
        """Set the backlog gauges from the table (every replica reports the same rows)."""
        try:
            events, age_s = await store_outbox.backlog(self._pool)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reading the outbox backlog failed: %s", exc)
            return
        self._metrics.outbox_backlog.set(events)
        self._metrics.outbox_oldest_age.set(age_s)

    async def _relay_logged(self, *, sweep: bool) -> bool:
        try:
            relayed = await self.relay()
        except RELAY_ERRORS as exc:
            log.warning(
                "API events stay in the outbox until Kafka takes them: %s",
                str(exc) or type(exc).__name__,
            )
            return False
        if sweep and relayed:
            log.info("outbox sweep published events", extra={"events": relayed})
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Relay after each commit, sweep every `sweep_interval_s`, until `stop` is set.

        After a failure, commits wait for a backoff (1 s doubling up to the sweep interval)
        instead of each retrying against a broker that is down.
        """
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()  # at start: whatever a crash or an outage left behind
        backoff_s = 0.0
        blocked_until = 0.0
        while not stop.is_set():
            now = loop.time()
            sweep = now >= next_sweep
            if sweep:
                next_sweep = now + self._sweep_interval_s
                await self.refresh_backlog()
            if sweep or (self._wake.is_set() and now >= blocked_until):
                self._wake.clear()
                if await self._relay_logged(sweep=sweep):
                    backoff_s = 0.0
                    blocked_until = 0.0
                else:
                    backoff_s = next_backoff(backoff_s, cap_s=self._sweep_interval_s)
                    blocked_until = loop.time() + backoff_s
                    self._wake.set()  # retry once the backoff is over
                continue
            wake_allowed = now >= blocked_until
            until = next_sweep if wake_allowed else min(next_sweep, blocked_until)
            await self._wait(stop, until - now, wake=wake_allowed)

    async def _wait(self, stop: asyncio.Event, timeout_s: float, *, wake: bool) -> None:
        waiters = [asyncio.create_task(stop.wait())]
        if wake:
            waiters.append(asyncio.create_task(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=max(timeout_s, 0), return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def final_relay(self) -> None:
        """At shutdown: one bounded relay of what is left; failures leave it to other replicas."""
        if await self._relay_logged(sweep=True):
            return
        log.warning("API events left in the outbox at shutdown; another replica will send them")
