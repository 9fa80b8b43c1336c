"""Run `cityops api` for tests, in-process or as a process of its own: fresh database, unique
topics and group, a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
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
from tests.integration.ingest_support import free_port
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

    def env(self, **overrides: str) -> dict[str, str]:
        """`CITYOPS_*` settings of `cityops api` as a process on this case (a free port)."""
        values = {
            **self.kafka.service("api").env(),
            "CITYOPS_DATABASE_URL": self.database_url,
            "CITYOPS_TOPIC_TELEMETRY": self.topics["city.telemetry.v1"],
            "CITYOPS_TOPIC_STATUS": self.topics["city.status.v1"],
            "CITYOPS_TOPIC_TICKETS": self.topics["city.tickets.v1"],
            "CITYOPS_TOPIC_DEVICES": self.topics["city.devices.v1"],
            "CITYOPS_TOPIC_DEADLETTER": self.topics["city.deadletter.v1"],
            "CITYOPS_TOPIC_PARTITIONS": "3",
            "CITYOPS_API_PORT": str(free_port()),
            "CITYOPS_API_BOOTSTRAP_KEY": BOOTSTRAP_KEY,
            "CITYOPS_API_PROJECTOR_GROUP": f"api-projector-test-{uuid.uuid4().hex[:12]}",
            "CITYOPS_API_KEY_CACHE_S": "0",
            "CITYOPS_SHUTDOWN_TIMEOUT_S": "5",
            "CITYOPS_DATABASE_POOL_MAX": "5",
            "CITYOPS_LOG_FORMAT": "json",
        }
        values.update(overrides)
        return values


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
            mqtt_device_password_file=Path(mqtt.device_password_file),
            mqtt_password_lock_file=Path(mqtt.lock_file),
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


@dataclass(frozen=True)
class ApiProcess:
    """`cityops api` running as a process of its own."""

    base_url: str
    pid: int

    def client(self, key: str | None = BOOTSTRAP_KEY, timeout: float = 10) -> httpx.AsyncClient:
        """An HTTP client with `key` as its bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)


@contextlib.asynccontextmanager
async def api_process(env: Mapping[str, str], log_path: Path) -> AsyncIterator[ApiProcess]:
    """`cityops api` with exactly `env` as its CITYOPS_* settings, ready; SIGTERM afterwards."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full_env.update(env)
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("cityops")),
            "api",
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = ApiProcess(f"http://127.0.0.1:{env['CITYOPS_API_PORT']}", process.pid)
    try:
        async with running.client(timeout=5) as http:

            async def ready() -> bool:
                assert process.returncode is None, f"cityops api exited; see {log_path}"
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=30, interval=0.2, message="api process ready")
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


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
