"""Helpers for the rules service's integration tests: topics, a worker in-process, readings."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry

from cityops.common.events import StatusEvent, encode_status, encode_telemetry, parse_reading
from cityops.common.kafka import kafka_consumer, kafka_producer
from cityops.common.kinds import Kind
from cityops.common.registry import Device, upsert_devices
from cityops.rules.config import load_rules
from cityops.rules.main import run
from cityops.rules.settings import RulesSettings
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "rules"


@dataclass
class RulesEnv:
    """Unique topics, a fresh database and a unique consumer group for one test."""

    kafka: StackKafka
    database_url: str
    topics: Mapping[str, str]
    group: str

    def settings(self, **overrides: Any) -> RulesSettings:
        """Settings for a worker of this test."""
        values: dict[str, Any] = {
            **self.kafka.service("rules").settings_values(),
            "database_url": self.database_url,
            "topic_telemetry": self.topics["city.telemetry.v1"],
            "topic_status": self.topics["city.status.v1"],
            "topic_tickets": self.topics["city.tickets.v1"],
            "topic_deadletter": self.topics["city.deadletter.v1"],
            "topic_partitions": 3,
            "rules_group": self.group,
            "metrics_port": 0,
            "rules_gauge_refresh_s": 1.0,
            "rules_registry_refresh_s": 1.0,
            "rules_session_timeout_ms": 6000,
            "log_format": "text",
        }
        values.update(overrides)
        return RulesSettings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        """The same settings as CITYOPS_* environment variables (for a subprocess)."""
        env = {
            **self.kafka.service("rules").env(),
            "CITYOPS_DATABASE_URL": self.database_url,
            "CITYOPS_TOPIC_TELEMETRY": self.topics["city.telemetry.v1"],
            "CITYOPS_TOPIC_STATUS": self.topics["city.status.v1"],
            "CITYOPS_TOPIC_TICKETS": self.topics["city.tickets.v1"],
            "CITYOPS_TOPIC_DEADLETTER": self.topics["city.deadletter.v1"],
            "CITYOPS_TOPIC_PARTITIONS": "3",
            "CITYOPS_RULES_GROUP": self.group,
            "CITYOPS_METRICS_PORT": "0",
            "CITYOPS_RULES_SESSION_TIMEOUT_MS": "6000",
            "CITYOPS_LOG_FORMAT": "json",
        }
        env.update({f"CITYOPS_{k.upper()}": v for k, v in overrides.items()})
        return env


async def make_rules_env(kafka_topics: Any, kafka: StackKafka, database_url: str) -> RulesEnv:
    """Topics (3 partitions each) and a group for one test."""
    topics = await kafka_topics(
        "city.telemetry.v1", "city.status.v1", "city.tickets.v1", "city.deadletter.v1", partitions=3
    )
    return RulesEnv(kafka, database_url, topics, f"rules-test-{uuid.uuid4().hex[:10]}")


@contextlib.asynccontextmanager
async def running_worker(
    settings: RulesSettings, rules_file: Path | None = None
) -> AsyncIterator[CollectorRegistry]:
    """Run the rules service in-process until the block ends (then stop it gracefully)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    registry = CollectorRegistry()
    task = asyncio.create_task(
        run(settings, load_rules(rules_file), stop=stop, registry=registry, ready=ready)
    )
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        raise AssertionError(f"rules worker exited during start: {task.result()}")
    assert waiter in done, "rules worker did not start within 30 s"
    try:
        yield registry
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=30) == 0


def now() -> datetime:
    """The current time, aware."""
    return datetime.now(UTC)


def reading(device_id: str, kind: Kind | str, seq: int, **fields: Any) -> dict[str, Any]:
    """A reading dict with ts now."""
    return {
        "device_id": device_id,
        "kind": str(kind),
        "ts": now().isoformat(),
        "seq": seq,
        **fields,
    }


class Feed:
    """An aiokafka producer for the test's input topics."""

    def __init__(self, env: RulesEnv) -> None:
        self._env = env
        self._producer = kafka_producer(env.kafka.admin, linger_ms=2)

    async def __aenter__(self) -> Feed:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def readings(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Produce readings (validated like ingest does) to the telemetry topic."""
        acks = []
        for item in items:
            value = encode_telemetry(
                parse_reading(orjson.dumps(item)), received_at=now(), ingest_id="test"
            )
            acks.append(
                await self._producer.send(
                    self._env.topics["city.telemetry.v1"],
                    key=str(item["device_id"]).encode(),
                    value=value,
                )
            )
        await asyncio.gather(*acks)

    async def status(self, device_id: str, kind: Kind, *, online: bool) -> None:
        """Produce a status message."""
        event = StatusEvent(
            device_id=device_id, kind=kind, online=online, received_at=now(), ingest_id="test"
        )
        await self._producer.send_and_wait(
            self._env.topics["city.status.v1"], key=device_id.encode(), value=encode_status(event)
        )


async def register(database_url: str, *devices: Device) -> None:
    """Put devices in the registry."""
    conn = await asyncpg.connect(database_url)
    try:
        await upsert_devices(conn, devices=devices)
    finally:
        await conn.close()


async def tickets(database_url: str, **where: Any) -> list[dict[str, Any]]:
    """Ticket rows matching equality filters, oldest first."""
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, start=1)) or "true"
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f"SELECT * FROM tickets WHERE {clauses} ORDER BY id",
            *where.values(),
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def transitions(database_url: str, ticket_id: int) -> list[dict[str, Any]]:
    """Audit rows of a ticket, in order."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM ticket_transitions WHERE ticket_id = $1 ORDER BY id", ticket_id
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def wait_ticket(database_url: str, *, within_s: float = 20, **where: Any) -> dict[str, Any]:
    """Wait until exactly one ticket matches; return it."""

    async def one() -> dict[str, Any] | None:
        rows = await tickets(database_url, **where)
        assert len(rows) <= 1, f"more than one ticket for {where}: {rows}"
        return rows[0] if rows else None

    return await wait_for(one, timeout=within_s, interval=0.1, message=f"ticket {where}")


async def ticket_events(
    env: RulesEnv, *, expect: int, within_s: float = 20
) -> list[dict[str, Any]]:
    """Read `expect` events (at least) from the tickets topic."""
    consumer = kafka_consumer(
        env.kafka.admin,
        env.topics["city.tickets.v1"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    events: list[dict[str, Any]] = []
    try:

        async def enough() -> bool:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                events.extend(orjson.loads(r.value) for r in records)
            return len(events) >= expect

        await wait_for(enough, timeout=within_s, interval=0.01, message=f"{expect} ticket events")
    finally:
        await consumer.stop()
    return events
