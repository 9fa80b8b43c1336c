"""Publishes registry changes (city.devices.v1) and ticket transitions (city.tickets.v1)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from cityops.common.tickets import TicketEvent

log = logging.getLogger(__name__)


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


class EventPublisher:
    """Kafka publishing after a database commit; failures are logged, never raised to clients."""

    def __init__(
        self, *, producer: AIOKafkaProducer, devices_topic: str, tickets_topic: str
    ) -> None:
        self._producer = producer
        self._devices_topic = devices_topic
        self._tickets_topic = tickets_topic

    async def devices_changed(self, rows: Iterable[Any]) -> None:
        """Publish the current registry row of each device (key = device_id)."""
        try:
            futures = [
                await self._producer.send(
                    self._devices_topic,
                    key=row["device_id"].encode(),
                    value=orjson.dumps(device_document(row)),
                )
                for row in rows
            ]
            for future in futures:
                await future
        except KafkaError as exc:
            log.error("publishing registry changes failed: %s", exc)  # noqa: TRY400 - expected

    async def device_deleted(self, device_id: str) -> None:
        """Publish a tombstone so compaction forgets the device."""
        try:
            await self._producer.send_and_wait(
                self._devices_topic, key=device_id.encode(), value=None
            )
        except KafkaError as exc:
            log.error("publishing a device tombstone failed: %s", exc)  # noqa: TRY400

    async def ticket_transition(self, event: TicketEvent) -> None:
        """Publish one ticket transition (key = device_id)."""
        try:
            await self._producer.send_and_wait(
                self._tickets_topic,
                key=event.device_id.encode(),
                value=event.model_dump_json().encode(),
            )
        except KafkaError as exc:
            log.error(  # noqa: TRY400 - expected failure mode, the message says it all
                "publishing a ticket transition failed: %s",
                exc,
                extra={"ticket_id": event.ticket_id, "transition_id": event.transition_id},
            )
