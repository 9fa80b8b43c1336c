"""MQTT 5 publishing at QoS 1 with paho-mqtt 2.x driven by the asyncio event loop.

paho's socket is registered with the running loop (add_reader/add_writer), so every paho
callback runs on the loop's thread and there is no network thread to hand over from. A
semaphore bounds the QoS 1 messages handed to paho and not yet acknowledged: paho's message
ids wrap at 65,535, and an unbounded queue would only hide a slow broker in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

MAX_OUTSTANDING_LIMIT = 60_000  # below paho's 65,535 message ids, with room for the rest
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0


class MqttConnectError(ConnectionError):
    """The broker refused the CONNECT (bad credentials, not authorised) or did not answer."""


@dataclass(slots=True)
class PublishStats:
    """Counts shared by every connection of one simulator run."""

    sent: int = 0  # handed to paho (on the wire, or queued by paho while reconnecting)
    acked: int = 0  # PUBACK with a success code
    refused: int = 0  # PUBACK with a failure code (e.g. 0x87 not authorised)
    local_errors: int = 0  # paho refused to take the message
    reconnects: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def errors(self) -> int:
        """Refused by the broker or by paho."""
        return self.refused + self.local_errors

    @property
    def outstanding(self) -> int:
        """Sent and not yet answered by a PUBACK."""
        return self.sent - self.acked - self.refused


class MqttPublisher:
    """One MQTT 5 connection that publishes QoS 1 messages with a bound on unacked ones."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        stats: PublishStats,
        max_outstanding: int = 1000,
        will: tuple[str, bytes] | None = None,
        keepalive_s: int = 30,
        track_ack_latency: bool = False,
    ) -> None:
        if not 1 <= max_outstanding <= MAX_OUTSTANDING_LIMIT:
            raise ValueError(f"max_outstanding must be 1..{MAX_OUTSTANDING_LIMIT}")
        self.client_id = client_id
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._stats = stats
        self._max_outstanding = max_outstanding
        self._will = will
        self._keepalive_s = keepalive_s
        self._slots = asyncio.Semaphore(max_outstanding)
        # publish -> PUBACK times (ms), kept only when asked (the benchmark's probes)
        self._sent_at: dict[int, float] | None = {} if track_ack_latency else None
        self.ack_latencies_ms: list[float] = []
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._connected = asyncio.Event()
        self._connack = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._refused: ReasonCode | None = None
        self._stopping = False
        self._paused = False  # gone silent on purpose (go_silent); no automatic reconnect
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up (CONNACK received and not lost since)."""
        return self._connected.is_set()

    @property
    def outstanding(self) -> int:
        """This connection's messages not yet acknowledged."""
        return self._outstanding

    def _new_client(self) -> Client:
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        client.max_inflight_messages_set(self._max_outstanding)
        client.max_queued_messages_set(0)  # the semaphore is the bound
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def connect(self, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - whole handshake
        """Open the connection and wait for a successful CONNACK."""
        self._loop = asyncio.get_running_loop()
        self._stopping, self._paused, self._refused = False, False, None
        self._connack.clear()
        self._client = self._new_client()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
        properties.SessionExpiryInterval = 300  # paho re-sends unacked messages on reconnect
        try:
            # paho connects a blocking socket; on loopback or a LAN this takes microseconds
            self._client.connect(
                self._host,
                self._port,
                keepalive=self._keepalive_s,
                clean_start=True,
                properties=properties,
            )
        except OSError as exc:
            raise MqttConnectError(f"cannot reach {self._host}:{self._port}: {exc}") from exc
        try:
            await asyncio.wait_for(self._connack.wait(), timeout=timeout)
        except TimeoutError:
            await self._teardown()
            raise MqttConnectError(f"{self.client_id}: no CONNACK within {timeout} s") from None
        if self._refused is not None:
            await self._teardown()
            raise MqttConnectError(f"{self.client_id}: CONNECT refused: {self._refused}")

    # --- paho callbacks (run on the event loop's thread) ---------------------------------

    def _on_connect(
        self,
        client: Client,
        _userdata: object,
        _flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._connack.set()
        if reason_code.is_failure:
            self._refused = reason_code
            log.warning(
                "mqtt connect refused",
                extra={"client_id": self.client_id, "reason": str(reason_code)},
            )
            self._stopping = True  # a refused CONNECT does not get better by retrying fast
            client.disconnect()
            return
        self._disconnected.clear()
        self._connected.set()

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: object,
        _flags: DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        if self._stopping or self._paused or self._loop is None:
            return
        if was_connected:
            log.warning(
                "mqtt connection lost; reconnecting",
                extra={"client_id": self.client_id, "reason": str(reason_code)},
            )
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._loop.create_task(self._reconnect())

    def _on_publish(
        self,
        _client: Client,
        _userdata: object,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self._sent_at is not None:
            sent_at = self._sent_at.pop(mid, None)
            if sent_at is not None:
                self.ack_latencies_ms.append((time.perf_counter() - sent_at) * 1000)
        if reason_code.is_failure:
            self._stats.refused += 1
            log.debug("publish refused", extra={"mid": mid, "reason": str(reason_code)})
        else:
            self._stats.acked += 1
        self._outstanding -= 1
        self._slots.release()
        if self._outstanding == 0:
            self._idle.set()

    def _on_socket_open(self, client: Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, client.loop_read)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = self._loop.create_task(self._misc())

    def _on_socket_close(self, _client: Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, _client: Client, _userdata: object, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    # --- background tasks -----------------------------------------------------------------

    async def _misc(self) -> None:
        """paho's housekeeping (keepalive PINGREQ, retries) once a second, as loop_start does."""
        while self._client is not None:
            await asyncio.sleep(1.0)
            self._client.loop_misc()

    async def _reconnect(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopping and self._client is not None and not self._connected.is_set():
            await asyncio.sleep(delay)
            try:
                self._client.reconnect()
            except OSError as exc:
                log.info(
                    "mqtt reconnect failed",
                    extra={"client_id": self.client_id, "error": str(exc), "retry_s": delay},
                )
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            self._stats.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), timeout=10.0)

    # --- publishing -----------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1; waits while `max_outstanding` messages are unacknowledged."""
        assert self._client is not None, "connect() first"
        await self._slots.acquire()
        info: MQTTMessageInfo = self._client.publish(topic, payload, qos=1)
        if self._sent_at is not None:
            self._sent_at[info.mid] = time.perf_counter()
        # NO_CONN: paho keeps QoS 1 messages while disconnected and sends them on reconnect
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._stats.sent += 1
            self._outstanding += 1
            self._idle.clear()
        else:
            self._stats.local_errors += 1
            self._slots.release()
            log.warning("publish failed locally", extra={"topic": topic, "rc": int(info.rc)})

    async def go_silent(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - bounded
        """Drop off the network the way a dying device does: the broker publishes our will.

        MQTT 5 DISCONNECT with reason 0x04 ("disconnect with will message"); no reconnect
        until `come_back()`.
        """
        if self._client is None or not self._connected.is_set():
            return
        self._paused = True
        will = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        self._client.disconnect(reasoncode=will)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._disconnected.wait(), timeout=timeout)

    async def come_back(self, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - bounded
        """Reconnect after `go_silent()`; paho re-sends what was queued meanwhile."""
        if self._client is None or not self._paused:
            return
        self._paused = False
        self._connack.clear()
        try:
            self._client.reconnect()
        except OSError as exc:
            raise MqttConnectError(f"{self.client_id}: cannot reconnect: {exc}") from exc
        self._stats.reconnects += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=timeout)

    async def flush(self, *, timeout: float) -> bool:  # noqa: ASYNC109 - a bound on the drain
        """Wait until every message is acknowledged; False when `timeout` passes first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - bounded close
        """Drain (bounded), DISCONNECT cleanly (no last will), stop the background tasks."""
        if self._client is not None and self._connected.is_set():
            await self.flush(timeout=timeout)
        self._stopping = True
        if self._client is not None and self._connected.is_set():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout=timeout)
        await self._teardown()

    async def _teardown(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._misc_task, self._reconnect_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
                with contextlib.suppress(OSError):
                    sock.close()


def pick_connection(publishers: Sequence[MqttPublisher], device_index: int) -> MqttPublisher:
    """The connection a device's messages always go through (keeps per-device order)."""
    return publishers[device_index % len(publishers)]


def gateway_client_id(prefix: str, number: int) -> str:
    """A client id unique to this host, run and connection number."""
    return f"{prefix}-{socket.gethostname()}-{number}"[:128]
