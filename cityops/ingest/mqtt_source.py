"""The MQTT side: a paho-mqtt 2.x client driven from the asyncio event loop, acks by hand.

paho's socket is registered with the event loop (add_reader / add_writer); there is no network
thread, so nothing crosses threads and a PUBACK is written by the same loop that produced to
Kafka. Profiling a bare paho client (docs/ingest.md) showed most of each message's ~24-45 us
going to three `recv` system calls per packet (command byte, length byte, body) and one `send`
per PUBACK; `_BufferedClient` serves paho's reads from one large `recv` and coalesces its writes
into one `send` per loop turn. Those are private hooks of paho 2.x (pinned < 3 in pyproject).

Reconnects: the first retry after a lost connection comes at once (`Backoff`), later ones back
off up to 15 s, and the backoff starts over once a connection got its subscription granted. The
shared subscriptions are sent on every CONNACK whatever `session_present` says: Mosquitto 2.0.11
restores the session after a restart but not its `$share/...` subscriptions (issue 11, row 1).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024
_HAND_OVER = 512  # messages per batch handed to the pipeline
SUBSCRIPTIONS = ("city/+/+/telemetry", "city/+/+/status")
_PUBACK = b"\x40\x02"  # PUBACK fixed header + remaining length 2; the packet id follows


class Backoff:
    """Delays between connection attempts: a fast first retry, then doubling up to a cap."""

    def __init__(self, *, first_s: float = 0.1, base_s: float = 0.5, cap_s: float = 15.0) -> None:
        self._first_s = first_s
        self._base_s = base_s
        self._cap_s = cap_s
        self._next_s: float | None = None

    def reset(self) -> None:
        """A connection worked: the next loss retries after `first_s` again."""
        self._next_s = None

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        if self._next_s is None:
            self._next_s = self._base_s
            return self._first_s
        delay = self._next_s
        self._next_s = min(delay * 2, self._cap_s)
        return delay


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received PUBLISH: enough to validate it and to acknowledge it later."""

    mid: int
    topic: bytes
    payload: bytes
    generation: int
    retained: bool = False  # RETAIN set: a replay of a stored message, never a new reading


def parse_qos1_publishes(
    buf: bytes | bytearray, pos: int, limit: int, out: list[tuple[int, bytes, bytes]]
) -> int:
    """Parse consecutive complete MQTT 3.1.1 QoS 1 PUBLISH packets from `buf[pos:]`.

    Appends up to `limit` (packet id, topic bytes, payload) to `out` and returns the position
    after the last one parsed. Stops, leaving the bytes for paho, at anything else: another
    packet type or QoS, RETAIN set (rare; paho's message carries the flag), an incomplete
    packet, or a malformed one (paho then reports it).
    """
    end_of_data = len(buf)
    while limit > 0 and pos < end_of_data:
        # Type 3 (PUBLISH) with QoS bits 01 and RETAIN (0x01) clear; DUP (0x08) may be either.
        if buf[pos] & 0xF7 != 0x32:
            break
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= end_of_data or shift > 21:
                return pos  # incomplete (or a malformed 5+ byte length): paho's turn
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        end = i + length
        if end > end_of_data:
            break
        topic_end = i + 2 + (buf[i] << 8 | buf[i + 1]) if length >= 2 else end + 1
        if topic_end + 2 > end:
            break  # malformed: topic and packet id do not fit
        mid = buf[topic_end] << 8 | buf[topic_end + 1]
        out.append((mid, bytes(buf[i + 2 : topic_end]), bytes(buf[topic_end + 2 : end])))
        pos = end
        limit -= 1
    return pos


class _BufferedClient(paho.Client):
    """paho Client whose socket I/O goes through buffers the event loop fills and drains."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rbuf = bytearray()
        self.rpos = 0
        self.wbuf = bytearray()
        self.eof = False
        self.on_inbound: Callable[[paho.MQTTMessage], None] | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        available = len(self.rbuf) - self.rpos
        if available <= 0:
            if self.eof:
                return b""  # paho reads this as "connection lost"
            raise BlockingIOError
        end = self.rpos + min(bufsize, available)
        chunk = bytes(self.rbuf[self.rpos : end])
        self.rpos = end
        if end == len(self.rbuf):
            self.rbuf.clear()
            self.rpos = 0
        return chunk

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("not connected")
        self.wbuf += buf
        return len(buf)

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # Straight to ingest: skips the per-message topic-filter match and callback mutexes.
        if self.on_inbound is not None:
            self.on_inbound(message)


class MqttSource:
    """Connects, subscribes with a shared subscription, hands messages over, acks in order."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str,
        share_group: str,
        protocol: str,
        receive_maximum: int,
        session_expiry_s: int,
        keepalive_s: int,
        on_messages: Callable[[list[Inbound]], None],
        on_connection_change: Callable[[bool], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._share_group = share_group
        self._v5 = protocol == "5"
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._on_messages = on_messages
        self._on_connection_change = on_connection_change
        self._backoff = backoff or Backoff()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._batch: list[Inbound] = []
        self._paused = False
        self._flush_scheduled = False
        self._fast_publish = not self._v5  # MQTT 5 PUBLISH carries properties: paho parses them
        self._parsed: list[tuple[int, bytes, bytes]] = []
        self._misc_timer: asyncio.TimerHandle | None = None
        self._disconnected: asyncio.Event = asyncio.Event()
        self._subscribed: asyncio.Event = asyncio.Event()
        self._granted_this_connection = False
        self.generation = 0
        self.connected = False
        self.reconnects = 0
        self.acks_sent = 0

        client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        client.username_pw_set(username, password)
        client.connect_timeout = 5.0
        client.on_inbound = self._on_inbound
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client = client

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop`; reconnect at once, then with capped exponential backoff."""
        self._loop = asyncio.get_running_loop()
        backoff = self._backoff
        while not stop.is_set():
            self._disconnected.clear()
            self._granted_this_connection = False
            try:
                self._connect()
            except (OSError, TimeoutError) as exc:
                log.warning("mqtt connect failed: %s", exc, extra={"host": self._host})
            else:
                stopped = asyncio.ensure_future(stop.wait())
                gone = asyncio.ensure_future(self._disconnected.wait())
                await asyncio.wait({stopped, gone}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                gone.cancel()
                if stop.is_set():
                    return
            # Not `self.connected`: _on_disconnect has cleared it by now (issue 11, row 4).
            if self._granted_this_connection:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("mqtt reconnecting in %.1f s", delay, extra={"retry_in_s": delay})
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                self.reconnects += 1

    def _connect(self) -> None:
        self.generation += 1
        client = self._client
        client.rbuf.clear()
        client.rpos = 0
        client.wbuf.clear()
        client.eof = False
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call] # paho leaves it untyped
            props.SessionExpiryInterval = self._session_expiry_s
            props.ReceiveMaximum = self._receive_maximum
            client.connect(
                self._host,
                self._port,
                keepalive=self._keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect(self._host, self._port, keepalive=self._keepalive_s)
        self._flush()

    @property
    def subscribed(self) -> bool:
        """Connected and the broker granted the shared subscriptions."""
        return self.connected and self._subscribed.is_set()

    async def close(self, *, within_s: float = 2.0) -> None:
        """Flush pending PUBACKs, send DISCONNECT and wait for the socket to close."""
        self.pause()
        if self._sock is None:
            return
        self._flush()
        self._client.disconnect()
        self._flush()
        try:
            await asyncio.wait_for(self._disconnected.wait(), timeout=within_s)
        except TimeoutError:
            log.warning("mqtt disconnect did not complete in %.1f s", within_s)

    # ---- flow control --------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading from the broker (the in-flight window is full, or we are stopping)."""
        if not self._paused:
            self._paused = True
            if self._sock is not None and self._loop is not None:
                self._loop.remove_reader(self._sock)

    def resume(self) -> None:
        """Read again; first consume what is already buffered."""
        if self._paused:
            self._paused = False
            if self._sock is not None and self._loop is not None:
                self._loop.add_reader(self._sock, self._on_readable)
                self._drain_buffer()

    def ack(self, mid: int, generation: int) -> None:
        """PUBACK one message, unless it came on an earlier connection (then it is redelivered).

        The 4-byte packet goes straight into the write buffer (paho keeps no state for inbound
        QoS 1, so this is what `client.ack` would queue); one `send` per loop turn carries all.
        """
        if generation != self.generation or self._sock is None:
            return
        self._client.wbuf += _PUBACK + mid.to_bytes(2, "big")
        self.acks_sent += 1
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write queued PUBACKs now (one send for all of them)."""
        self._flush()

    # ---- paho callbacks (all run on the event loop thread) -------------------------------

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if not self._paused:
            self._loop.add_reader(sock, self._on_readable)
        self._schedule_misc()

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._flush()
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._sock = None
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None

    def _on_register_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        # paho queued a packet; write it at the end of this loop turn, coalesced with others.
        assert self._loop is not None
        self._loop.call_soon(self._write_now)

    def _on_unregister_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        return

    def _write_now(self) -> None:
        if self._sock is not None:
            self._client.loop_write()
            self._flush()

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("mqtt connection refused: %s", reason, extra={"host": self._host})
            return
        self.connected = True
        log.info(
            "mqtt connected",
            extra={
                "host": self._host,
                "session_present": flags.session_present,
                "generation": self.generation,
            },
        )
        if self._on_connection_change is not None:
            self._on_connection_change(True)
        topics = [f"$share/{self._share_group}/{sub}" for sub in SUBSCRIPTIONS]
        if self._v5:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        else:
            client.subscribe([(t, 1) for t in topics])

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            # Connected but fed nothing would be an outage that looks healthy: reconnect (with
            # backoff, since nothing was granted) until the broker grants the subscription.
            log.error("mqtt subscription refused: %s", [str(r) for r in reasons])
            self._client.disconnect()
            return
        log.info("mqtt subscribed", extra={"share_group": self._share_group})
        self._granted_this_connection = True
        self._subscribed.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was = self.connected
        self.connected = False
        self._subscribed.clear()
        self._disconnected.set()
        if was:
            log.warning("mqtt disconnected: %s", reason, extra={"host": self._host})
            if self._on_connection_change is not None:
                self._on_connection_change(False)

    def _on_inbound(self, message: paho.MQTTMessage) -> None:
        # The raw topic bytes: `message.topic` raises on invalid UTF-8, which must dead-letter.
        self._batch.append(
            Inbound(
                message.mid,
                bytes(message._topic),
                bytes(message.payload),
                self.generation,
                bool(message.retain),
            )
        )

    # ---- socket events -------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(_READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("mqtt socket error: %s", exc)
            data = b""
        if data:
            self._client.rbuf += data
        else:
            self._client.eof = True
        self._drain_buffer()

    def _drain_buffer(self) -> None:
        client = self._client
        while (client.rbuf or client.eof) and not self._paused and self._sock is not None:
            # The hot path: complete QoS 1 PUBLISH packets are parsed here, straight from the
            # buffer; everything else (CONNACK, SUBACK, PINGRESP, partial packets) is paho's.
            if self._fast_publish and client._in_packet["command"] == 0 and self._parse_fast():
                continue
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if len(self._batch) >= _HAND_OVER:
                self._hand_over()
        self._hand_over()
        self._flush()

    def _parse_fast(self) -> bool:
        """Take the complete QoS 1 PUBLISH packets at the buffer's head; False if none."""
        client = self._client
        parsed = self._parsed
        room = _HAND_OVER - len(self._batch)
        end = parse_qos1_publishes(client.rbuf, client.rpos, max(room, 1), parsed)
        if not parsed:
            return False
        generation = self.generation
        self._batch.extend(Inbound(mid, topic, body, generation) for mid, topic, body in parsed)
        parsed.clear()
        if end == len(client.rbuf):
            client.rbuf.clear()
            client.rpos = 0
        else:
            client.rpos = end
        client._last_bytes_received = paho.time_func()  # paho's keepalive clock
        if len(self._batch) >= _HAND_OVER:
            self._hand_over()
        return True

    def _hand_over(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._on_messages(batch)

    def _flush(self) -> None:
        self._flush_scheduled = False
        client = self._client
        sock = self._sock
        if sock is None or not client.wbuf:
            return
        try:
            sent = sock.send(client.wbuf)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.warning("mqtt send failed: %s", exc)
            return
        del client.wbuf[:sent]
        if client.wbuf and self._loop is not None:
            self._loop.add_writer(sock, self._on_writable)

    def _on_writable(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_writer(self._sock)
            self._flush()

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        self._misc_timer = self._loop.call_later(1.0, self._misc)

    def _misc(self) -> None:
        # Keepalive: paho sends PINGREQ and detects a dead broker from here.
        if self._sock is None:
            return
        self._client.loop_misc()
        self._flush()
        if self._sock is not None:
            self._schedule_misc()
