"""Broker memory: RSS of the stack's Mosquitto with 10,000 connected devices, beside Debian's.

`run_stack_bench(env)` starts two brokers of its own (cityops.stack.mosquitto_instance) on
ports 19850-19899, one after the other: the stack's broker with the config the stack renders,
and Debian 12's Mosquitto 2.0.11 (`/usr/sbin/mosquitto`) with the password-file + ACL setup
the stack used before. Each gets the same device accounts; `devices` clients CONNECT with their
own credentials over raw asyncio sockets (paho's thread per client would not fit 10,000) and
stay connected while the broker's VmRSS is read. Then 4 `mosquitto_pub -l` (devices, QoS 1)
send `messages` readings to one `mosquitto_sub` on `$share/ingest/...` (QoS 1): the broker's
throughput with C clients, so Python is not what is measured. The shared broker on 1883 is
not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import struct
import time
import uuid
from collections.abc import Mapping
from typing import Any

from cityops.stack import mosquitto
from cityops.stack.mosquitto_instance import BrokerInstance, broker_tempdir, free_port

PORTS = range(19850, 19900)
DEBIAN_BINARY = "/usr/sbin/mosquitto"
_CONNECTS_AT_ONCE = 200
_KEEPALIVE_S = 600
_PUBLISHERS = 4  # longer than the whole measurement: the broker never times a client out

# Debian 12's 2.0.11 as the stack ran it before the auth plugin: same limits and persistence.
DEBIAN_CONF = """\
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous false
password_file {home}/passwd
acl_file {home}/acl
persistence true
persistence_location {home}/data/
autosave_interval 60
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 1000
persistent_client_expiration 7d
max_packet_size 262144
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
connection_messages false
"""


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connect_packet(*, client_id: str, username: str, password: str, keepalive_s: int) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session, username and password."""
    flags = 0x80 | 0x40 | 0x02
    variable = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s)
    body = variable + _mqtt_string(client_id) + _mqtt_string(username) + _mqtt_string(password)
    return b"\x10" + _remaining_length(len(body)) + body


async def _connect(
    port: int, device_id: str, password: str, gate: asyncio.Semaphore
) -> asyncio.StreamWriter | None:
    """CONNECT one device; its open writer on CONNACK 0, None when refused."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            connect_packet(
                client_id=device_id,
                username=device_id,
                password=password,
                keepalive_s=_KEEPALIVE_S,
            )
        )
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), timeout=30)
    if connack[0] != 0x20 or connack[3] != 0:
        writer.close()
        return None
    return writer


async def _measure(
    broker: BrokerInstance,
    accounts: Mapping[str, str],
    *,
    devices: int,
    ingest: tuple[str, str],
    messages: int,
) -> dict[str, Any]:
    await asyncio.to_thread(broker.start)
    try:
        idle_kb = broker.rss_kb()
        gate = asyncio.Semaphore(_CONNECTS_AT_ONCE)
        started = time.monotonic()
        results = await asyncio.gather(
            *(_connect(broker.port, d, pw, gate) for d, pw in list(accounts.items())[:devices]),
            return_exceptions=True,
        )
        connect_s = time.monotonic() - started
        writers = [w for w in results if isinstance(w, asyncio.StreamWriter)]
        try:
            # the broker has processed every CONNECT it answered: its memory is settled
            connected_kb = broker.rss_kb()
        finally:
            for writer in writers:
                writer.close()
        publishers = list(accounts.items())[:_PUBLISHERS]
        flow = await _throughput(broker.port, ingest=ingest, devices=publishers, count=messages)
        return {
            **flow,
            "version": broker.version(),
            "connected": len(writers),
            "connect_s": round(connect_s, 2),
            "rss_idle_mb": round(idle_kb / 1024, 1),
            "rss_connected_mb": round(connected_kb / 1024, 1),
            "kb_per_device": round((connected_kb - idle_kb) / max(len(writers), 1), 2),
        }
    finally:
        await asyncio.to_thread(broker.stop)


async def _throughput(
    port: int, *, ingest: tuple[str, str], devices: list[tuple[str, str]], count: int
) -> dict[str, Any]:
    """QoS 1 from `len(devices)` mosquitto_pub processes to one `$share` mosquitto_sub."""
    user, password = ingest
    per_device = count // len(devices)
    total = per_device * len(devices)
    subscriber = await asyncio.create_subprocess_exec(
        *("mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password),
        *("-i", f"{user}-bench-{uuid.uuid4().hex[:6]}", "-q", "1", "-C", str(total)),
        *("-W", "120", "-t", "$share/ingest/city/+/+/telemetry"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    # mosquitto_sub prints nothing when subscribed: give it a moment before anything is sent
    await asyncio.sleep(1.0)
    started = time.monotonic()
    publishers = []
    for device_id, device_password in devices:
        lines = b"".join(_reading_line(device_id, seq) for seq in range(per_device))
        publisher = await asyncio.create_subprocess_exec(
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-i", device_id),
            *("-u", device_id, "-P", device_password, "-q", "1", "-l"),
            *("-t", f"city/parking/{device_id}/telemetry"),
            stdin=asyncio.subprocess.PIPE,
        )
        assert publisher.stdin is not None
        publisher.stdin.write(lines)
        publisher.stdin.close()
        publishers.append(publisher)
    await asyncio.gather(*(p.wait() for p in publishers))
    published_s = time.monotonic() - started
    received_all = await subscriber.wait() == 0
    delivered_s = time.monotonic() - started
    return {
        "qos1_messages": total,
        "qos1_received_all": received_all,
        "qos1_publish_msgs_per_s": round(total / published_s),
        "qos1_delivered_msgs_per_s": round(total / delivered_s),
    }


def _reading_line(device_id: str, seq: int) -> bytes:
    return (
        f'{{"device_id":"{device_id}","kind":"parking","ts":"2026-01-01T00:00:00+00:00",'
        f'"seq":{seq},"occupied":true}}\n'
    ).encode()


def _allow_sockets(count: int) -> None:
    """Raise this process's open-file limit (inherited by the brokers) to fit `count` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise RuntimeError(f"open-file limit {hard} is below the {wanted} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def run_stack_bench(
    env: Mapping[str, str], *, devices: int = 10_000, messages: int = 100_000
) -> dict[str, Any]:
    """For the stack's broker, then Debian's 2.0.11: RSS idle and with `devices` connected,
    then `messages` QoS 1 readings from 4 publishers to one shared subscriber."""
    _allow_sockets(devices)
    tag = uuid.uuid4().hex[:6]
    ingest = (env["CITYOPS_INGEST_MQTT_USERNAME"], secrets.token_urlsafe(12))
    accounts = {f"rss-{tag}-{n:05d}": secrets.token_urlsafe(12) for n in range(devices)}
    results: dict[str, Any] = {"devices": devices}
    with broker_tempdir("cityops-bench-broker-") as tmp:
        for name, binary in (("stack", mosquitto.BINARY), ("debian", DEBIAN_BINARY)):
            home = tmp / name
            port = free_port(PORTS)
            conf = DEBIAN_CONF.format(port=port, home=home) if name == "debian" else None
            broker = await asyncio.to_thread(
                BrokerInstance.create,
                home,
                port=port,
                accounts={**accounts, ingest[0]: ingest[1]},
                binary=binary,
                conf_text=conf,
            )
            try:
                measured = await _measure(
                    broker, accounts, devices=devices, ingest=ingest, messages=messages
                )
            finally:
                with contextlib.suppress(OSError):
                    broker.close()
            results.update({f"{name}_{key}": value for key, value in measured.items()})
    results["rss_connected_ratio_to_debian"] = round(
        results["stack_rss_connected_mb"] / results["debian_rss_connected_mb"], 3
    )
    return results
