"""Real requests against each server: ready means it answered one, not that a port is open."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
from paho.mqtt.client import Client, ConnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cityops.common.kafka import KafkaAccess, kafka_admin
from cityops.stack.layout import StackError

# A probe returns None when the server answered correctly, else why not (for the final message).
Probe = Callable[[], Awaitable[str | None]]


async def probe_kafka(access: KafkaAccess) -> str | None:
    """Ask the broker for cluster metadata with aiokafka's admin client."""
    admin = kafka_admin(access, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), timeout=6)
        await asyncio.wait_for(admin.list_topics(), timeout=6)
    except Exception as exc:  # any failure means "not ready yet"; reported at the deadline
        return f"{type(exc).__name__}: {exc}"
    finally:
        await admin.close()
    return None


def mqtt_connect_reason(
    host: str,
    port: int,
    *,
    username: str | None,
    password: str | None,
    timeout_s: float = 5.0,
    client_id: str | None = None,
) -> str | None:
    """CONNECT with MQTT 5; None on CONNACK success, else the reason (blocking: run in a thread).

    The default client id is `<username>-probe-<random>`: the broker binds a device's client
    ids to its id (the id itself or id-suffix), and a probe must not take a real client over.
    """
    probe = uuid.uuid4().hex[:12]
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id
        or (f"{username}-probe-{probe}" if username else f"cityops-stack-probe-{probe}"),
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    outcome: list[ReasonCode] = []

    def on_connect(
        _client: Client,
        _userdata: object,
        _flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        outcome.append(reason_code)

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=0.1)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.disconnect()
        # one more loop pass flushes DISCONNECT and closes the socket
        client.loop(timeout=0.05)
    if not outcome:
        return "no CONNACK"
    return None if not outcome[0].is_failure else f"CONNACK {outcome[0]}"


async def probe_mqtt(host: str, port: int, username: str, password: str) -> str | None:
    """A real CONNECT with a service account."""
    return await asyncio.to_thread(
        mqtt_connect_reason, host, port, username=username, password=password
    )


async def probe_postgres(dsn: str) -> str | None:
    """`SELECT 1` over TCP."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        value = await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return None if value == 1 else f"SELECT 1 returned {value!r}"


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - our own http URL
        status: int = response.status
        return status


async def probe_http_ok(url: str) -> str | None:
    """HTTP GET answering 200."""
    try:
        status = await asyncio.to_thread(_http_status, url)
    except (OSError, urllib.error.URLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if status == 200 else f"HTTP {status}"


async def wait_ready(
    name: str,
    probe: Probe,
    *,
    timeout_s: float,
    alive: Callable[[], str | None],
    interval_s: float = 0.5,
) -> float:
    """Retry `probe` until it succeeds (returns seconds waited) or the deadline passes.

    `alive()` returns None while the server process lives, else a one-line reason (e.g. the
    tail of its log): a dead server fails at once instead of at the deadline.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    reason: str | None = "not tried"
    while True:
        reason = await probe()
        if reason is None:
            return time.monotonic() - started
        death = alive()
        if death is not None:
            raise StackError(f"{name} exited: {death}")
        if time.monotonic() >= deadline:
            raise StackError(f"{name} did not answer within {timeout_s:.0f}s: {reason}")
        await asyncio.sleep(interval_s)
