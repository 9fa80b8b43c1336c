"""Ticket events to `city.tickets.v1`, relayed from the outbox after the database commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from cityops.common.tickets import TicketEvent
from cityops.rules import store
from cityops.rules.metrics import RulesMetrics
from cityops.rules.store import OutboxEvent

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000


def outbox_events(events: Sequence[TicketEvent]) -> list[OutboxEvent]:
    """The events as stored in the outbox."""
    return [OutboxEvent(e.transition_id, e.device_id, e.model_dump_json().encode()) for e in events]


class TicketPublisher:
    """Produces outbox events (acks=all, idempotent) and deletes them once Kafka has them."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
        topic: str,
        metrics: RulesMetrics,
    ) -> None:
        self._producer = producer
        self._pool = pool
        self._topic = topic
        self._metrics = metrics
        self._in_flight: set[asyncio.Task[None]] = set()

    async def publish_soon(self, events: Sequence[OutboxEvent], *, max_in_flight: int = 4) -> None:
        """Enqueue `events` in order now; wait for Kafka's acks and clean the outbox meanwhile.

        The next batch is evaluated while these acks travel; at most `max_in_flight` batches
        of events are unacknowledged. A failure leaves the events in the outbox for the sweep.
        """
        if not events:
            return
        while len(self._in_flight) >= max_in_flight:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        acks = [
            await self._producer.send(
                self._topic, key=event.device_id.encode(), value=event.payload
            )
            for event in events
        ]
        task = asyncio.create_task(self._settle(acks, [e.transition_id for e in events]))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _settle(self, acks: list[asyncio.Future[object]], transition_ids: list[int]) -> None:
        try:
            await asyncio.gather(*acks)
            self._metrics.events_published.inc(len(acks))
            await store.delete_outbox(self._pool, transition_ids=transition_ids)
        except (KafkaError, asyncpg.PostgresError, OSError) as exc:
            self._metrics.errors.labels("kafka").inc()
            log.warning("ticket events stay in the outbox for the next sweep: %s", exc)

    async def flush(self) -> None:
        """Wait for every event handed over so far to be settled."""
        if self._in_flight:
            await asyncio.wait(self._in_flight)

    async def publish(self, events: Sequence[OutboxEvent]) -> None:
        """Produce `events` in order and delete them from the outbox; errors propagate."""
        if not events:
            return
        acks = [
            await self._producer.send(
                self._topic, key=event.device_id.encode(), value=event.payload
            )
            for event in events
        ]
        await asyncio.gather(*acks)
        self._metrics.events_published.inc(len(events))
        await store.delete_outbox(self._pool, transition_ids=[e.transition_id for e in events])

    async def sweep(self, *, older_than_s: float) -> int:
        """Publish what a crash left in the outbox; returns how many events were relayed."""
        relayed = 0
        while True:
            events = await store.load_outbox(
                self._pool, older_than_s=older_than_s, limit=SWEEP_BATCH
            )
            if not events:
                return relayed
            await self.publish(events)
            relayed += len(events)
            log.info("relayed ticket events left in the outbox", extra={"events": len(events)})
