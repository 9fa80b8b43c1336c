"""Test helpers: wait on a condition with a deadline (never a bare sleep), small MQTT clients."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from paho.mqtt.client import Client, ConnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

T = TypeVar("T")


class WaitTimeoutError(AssertionError):
    """A condition did not become true before its deadline."""


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,  # noqa: ASYNC109 - see the implementation
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float,  # noqa: ASYNC109 - see the implementation
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the whole wait, not one call
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Await until `predicate()` returns something truthy (sync or async); return that value.

    Raises WaitTimeoutError (an AssertionError, so pytest shows it as a failure) after `timeout`
    seconds, with the last exception the predicate raised as its cause.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except AssertionError as exc:  # an assertion inside the predicate means "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"{message} not met within {timeout}s") from last_error
        await asyncio.sleep(interval)


@dataclass
class MqttTestClient:
    """A paho client on its own network thread, with thread-safe records of what happened.

    Use `connect()`, then `subscribe()` / `publish()`; the `*_event` waits are bounded.
    """

    host: str
    port: int
    username: str | None
    password: str | None
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    # default: `<username>-test-<random>` (the broker binds a device's client ids to its id)
    client_id: str = ""
    connack: ReasonCode | None = None
    messages: list[MQTTMessage] = field(default_factory=list)
    puback: dict[int, ReasonCode] = field(default_factory=dict)
    suback: dict[int, list[ReasonCode]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connected: threading.Event = field(default_factory=threading.Event)
    _client: Client | None = None

    def __post_init__(self) -> None:
        if not self.client_id:
            self.client_id = f"{self.username or 'anonymous'}-test-{uuid.uuid4().hex[:12]}"

    def connect(self, *, timeout: float = 10.0) -> ReasonCode:
        """CONNECT and wait for CONNACK; returns its reason code (failure codes included)."""
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(timeout):
            raise WaitTimeoutError(f"no CONNACK within {timeout}s")
        assert self.connack is not None
        return self.connack

    def _on_connect(
        self,
        _client: Client,
        _userdata: object,
        _flags: ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self.connack is None:
            self.connack = reason_code
            self._connected.set()
        if reason_code.is_failure:
            # do not let paho retry a refused CONNECT forever
            _client.disconnect()

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def _on_publish(
        self,
        _client: Client,
        _userdata: object,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._lock:
            self.puback[mid] = reason_code

    def _on_subscribe(
        self,
        _client: Client,
        _userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        with self._lock:
            self.suback[mid] = list(reason_codes)

    @property
    def client(self) -> Client:
        """The connected paho client."""
        assert self._client is not None, "connect() first"
        return self._client

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """SUBSCRIBE; returns the message id to look up in `suback`."""
        result, mid = self.client.subscribe(topic, qos=qos)
        assert result == 0, f"subscribe failed locally: {result}"
        assert mid is not None
        return mid

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> MQTTMessageInfo:
        """PUBLISH; for QoS 1 the broker's PUBACK reason lands in `puback[info.mid]`."""
        return self.client.publish(topic, payload, qos=qos)

    def received(self, topic: str) -> list[MQTTMessage]:
        """Messages received on `topic` so far."""
        with self._lock:
            return [message for message in self.messages if message.topic == topic]

    def close(self) -> None:
        """DISCONNECT and stop the network thread."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
