"""Run `cityops api` in-process for tests: fresh database, unique topics and group, port 0."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from prometheus_client import CollectorRegistry

from cityops.api.context import ApiContext
from cityops.api.main import running_service
from cityops.api.settings import ApiSettings
from cityops.common.events import encode_telemetry, parse_reading
from cityops.common.kafka import KafkaAccess, kafka_producer
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka

BASE_TOPICS = (
    "city.telemetry.v1",
    "city.status.v1",
    "city.tickets.v1",
    "city.devices.v1",
    "city.deadletter.v1",
)
BOOTSTRAP_KEY = "test-bootstrap-" + uuid.uuid4().hex


@dataclass(frozen=True)
class ApiCase:
    """One API test's fresh database and topics (the `api_case` fixture)."""

    database_url: str
    kafka: StackKafka
    topics: Mapping[str, str]

    def settings(self, *, mqtt: Any | None = None, **overrides: Any) -> ApiSettings:
        """`api_settings` for this case's database and topics."""
        return api_settings(
            database_url=self.database_url,
            kafka=self.kafka,
            topics=self.topics,
            mqtt=mqtt,
            **overrides,
        )


def api_settings(
    *,
    database_url: str,
    kafka: StackKafka,
    topics: Mapping[str, str],
    mqtt: Any | None = None,
    **overrides: Any,
) -> ApiSettings:
    """Settings for one test: everything unique, HTTP on a free port."""
    values: dict[str, Any] = {
        "database_url": database_url,
        **kafka.service("api").settings_values(),
        "topic_telemetry": topics["city.telemetry.v1"],
        "topic_status": topics["city.status.v1"],
        "topic_tickets": topics["city.tickets.v1"],
        "topic_devices": topics["city.devices.v1"],
        "topic_deadletter": topics["city.deadletter.v1"],
        "topic_partitions": 3,
        "api_port": 0,
        "api_bootstrap_key": BOOTSTRAP_KEY,
        "api_projector_group": f"api-projector-test-{uuid.uuid4().hex[:12]}",
        "api_projector_fetch_timeout_ms": 100,
        "api_key_cache_s": 0,
        "shutdown_timeout_s": 5,
        "database_pool_max": 5,
        "log_format": "text",
    }
    if mqtt is not None:
        values.update(
            mqtt_password_file=Path(mqtt.password_file),
            mqtt_service_password_file=Path(mqtt.service_password_file),
            mqtt_device_password_file=Path(mqtt.device_password_file),
            mqtt_password_lock_file=Path(mqtt.lock_file),
            mqtt_broker_pid_file=Path(mqtt.broker_pid_file),
        )
    values.update(overrides)
    return ApiSettings(**values)


@dataclass
class RunningApi:
    """An API running in this process."""

    base_url: str
    settings: ApiSettings
    context: ApiContext
    registry: CollectorRegistry
    stop: asyncio.Event

    def client(self, key: str | None = BOOTSTRAP_KEY) -> httpx.AsyncClient:
        """An HTTP client with `key` as its bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=10)


@contextlib.asynccontextmanager
async def run_api(settings: ApiSettings) -> AsyncIterator[RunningApi]:
    """Start the whole service (projector included) and stop it gracefully afterwards."""
    stop = asyncio.Event()
    registry = CollectorRegistry()
    async with running_service(settings, stop, registry) as (server, context):
        task = asyncio.create_task(server.serve())
        await wait_for(lambda: server.started, timeout=15, message="uvicorn started")
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield RunningApi(f"http://127.0.0.1:{port}", settings, context, registry, stop)
        finally:
            stop.set()
            await context.broadcaster.close()
            server.should_exit = True
            await asyncio.wait_for(task, 15)


def telemetry(device_id: str, kind: str, seq: int, ts: datetime, **values: Any) -> bytes:
    """A `city.telemetry.v1` record value as ingest writes it."""
    body = {"device_id": device_id, "kind": kind, "seq": seq, "ts": ts.isoformat(), **values}
    reading = parse_reading(orjson.dumps(body))
    return encode_telemetry(reading, received_at=datetime.now(UTC), ingest_id="test")


async def produce(access: KafkaAccess, topic: str, records: list[tuple[str, bytes]]) -> None:
    """Produce (key, value) records and wait for the acks."""
    producer = kafka_producer(access, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, key=key.encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def open_ticket(
    database_url: str,
    *,
    device_id: str,
    rule: str = "bin_full",
    district: str = "north",
    opened_at: datetime | None = None,
    due_at: datetime | None = None,
) -> int:
    """An open P3 sanitation ticket as the rules service writes it (row + `opened` audit)."""
    now = datetime.now(UTC)
    conn = await asyncpg.connect(database_url)
    try:
        ticket_id: int = await conn.fetchval(
            """
            INSERT INTO tickets (device_id, kind, district, rule, priority, department, status,
                                 opened_at, due_at, last_seen_at, details)
            VALUES ($1, 'wastebin', $2, $3, 'P3', 'sanitation', 'open', $4, $5, $4, '{}')
            RETURNING id
            """,
            device_id,
            district,
            rule,
            opened_at or now - timedelta(hours=1),
            due_at or now + timedelta(hours=3),
        )
        await conn.execute(
            """
            INSERT INTO ticket_transitions (ticket_id, action, to_status, to_priority, actor,
                                            version)
            VALUES ($1, 'opened', 'open', 'P3', 'rules', 1)
            """,
            ticket_id,
        )
        return ticket_id
    finally:
        await conn.close()
