"""Ingest drain benchmark: N readings queued in the broker, then ingest started; time to Kafka.

Same run, same queued-session setup, baseline: `mosquitto_sub` (C client) piped into
`kcat -P` -- no validation, no ack discipline. `run_ingest_bench()` returns the numbers as a dict
for `make bench`; `python -m bench.ingest` prints them as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from paho.mqtt.client import Client, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cityops.common.kafka import (
    KafkaAccess,
    kafka_admin,
    kafka_consumer,
    kcat_args,
    scratch_topic,
)
from cityops.common.kinds import Kind
from cityops.common.migrate import apply_migrations
from cityops.common.mqtt_sessions import purge_session
from cityops.common.registry import Device, upsert_devices
from cityops.common.scratch import drop_database

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _proc_peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _session(host: str, port: int, *, user: str, password: str, client_id: str, topic: str) -> None:
    """Create a persistent session subscribed to `topic` at QoS 1, then leave it queued."""
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=False,
    )
    client.username_pw_set(user, password)
    client.connect(host, port)
    client.loop_start()
    _, mid = client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while client.is_connected() is False and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the SUBACK; sessions exist once the broker processed SUBSCRIBE
    client.disconnect()
    client.loop_stop()
    del mid


def _publish(
    host: str, port: int, *, user: str, password: str, devices: list[str], count: int
) -> float:
    """Publish `count` QoS 1 readings round-robin over `devices`; returns seconds taken."""
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    started = time.monotonic()
    base = datetime.now(UTC) - timedelta(days=1)
    window: list[MQTTMessageInfo] = []
    per_device = max(1, count // len(devices))
    for n in range(count):
        device = devices[n % len(devices)]
        seq = n // len(devices)
        ts = base + timedelta(seconds=60 * seq * 86_400 / (60 * per_device * 2))
        payload = orjson.dumps(
            {
                "device_id": device,
                "kind": "wastebin",
                "ts": ts.isoformat(),
                "seq": seq,
                "fill_pct": float(n % 100),
                "battery_pct": 80.0,
            }
        )
        window.append(client.publish(f"city/wastebin/{device}/telemetry", payload, qos=1))
        if len(window) >= 5000:  # message ids wrap at 65,535
            for info in window:
                info.wait_for_publish(60)
            window.clear()
    for info in window:
        info.wait_for_publish(60)
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


async def _topic_count(kafka: KafkaAccess, topic: str) -> int:
    consumer = kafka_consumer(kafka)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _wait_count(
    kafka: KafkaAccess, topic: str, target: int, timeout_s: float
) -> float | None:
    """Seconds (monotonic) at which `topic` held `target` records, None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _topic_count(kafka, topic) >= target:
            return time.monotonic()
        await asyncio.sleep(0.1)
    return None


async def run_ingest_bench(  # noqa: PLR0915 - one linear script, easier to read whole
    env: Mapping[str, str],
    *,
    count: int = 200_000,
    devices: int = 2_000,
    protocol: str = "3.1.1",
    baseline: bool = True,
    timeout_s: float = 600,
    ingest_command: list[str] | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """Queue `count` readings for a stopped ingest, start it, time the drain; the same for
    the mosquitto_sub | kcat baseline. `env` holds the stack's CITYOPS_* settings.

    With `replicas` > 1, that many ingest processes (one share group, own sessions, all queued
    before publishing) drain together; CPU is their sum, RSS the largest."""
    tag = uuid.uuid4().hex[:8]
    kafka = KafkaAccess.from_env(env, principal="admin")
    mqtt = urlsplit(env["CITYOPS_MQTT_URL"])
    host, port = mqtt.hostname or "127.0.0.1", mqtt.port or 1883
    ingest_user = env["CITYOPS_INGEST_MQTT_USERNAME"]
    ingest_pw = env["CITYOPS_INGEST_MQTT_PASSWORD"]
    gw_user = env["CITYOPS_SIMULATOR_MQTT_USERNAME"]
    gw_pw = env["CITYOPS_SIMULATOR_MQTT_PASSWORD"]
    topics = {
        name: scratch_topic(name, f"bench-{tag}")
        for name in ("telemetry", "status", "deadletter", "baseline")
    }
    group, base_group = f"bench-{tag}", f"bench-base-{tag}"
    client_ids = [f"ingest-bench-{tag}-{n}" for n in range(replicas)]
    base_client = f"bench-sub-{tag}"
    device_ids = [f"bench-{tag}-{n:05d}" for n in range(devices)]

    admin_url = env["CITYOPS_DATABASE_URL"]
    db_name = f"bench_ingest_{tag}"
    db_url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{db_name}"))
    admin_db = await asyncpg.connect(admin_url)
    admin_kafka = kafka_admin(kafka)
    await admin_kafka.start()
    results: dict[str, Any] = {
        "count": count,
        "devices": devices,
        "protocol": protocol,
        "replicas": replicas,
    }
    try:
        await admin_db.execute(f'CREATE DATABASE "{db_name}"')
        conn = await asyncpg.connect(db_url)
        try:
            await apply_migrations(conn)
            await upsert_devices(
                conn, devices=[Device(device_id=d, kind=Kind.WASTEBIN) for d in device_ids]
            )
        finally:
            await conn.close()
        await admin_kafka.create_topics(
            [NewTopic(t, num_partitions=12, replication_factor=1) for t in topics.values()]
        )
        share = "city/+/+/telemetry"
        for client_id in client_ids:
            await asyncio.to_thread(
                functools.partial(
                    _session,
                    host,
                    port,
                    user=ingest_user,
                    password=ingest_pw,
                    client_id=client_id,
                    topic=f"$share/{group}/{share}",
                )
            )
        if baseline:
            await asyncio.to_thread(
                functools.partial(
                    _session,
                    host,
                    port,
                    user=ingest_user,
                    password=ingest_pw,
                    client_id=base_client,
                    topic=f"$share/{base_group}/{share}",
                )
            )
        results["publish_s"] = round(
            await asyncio.to_thread(
                functools.partial(
                    _publish,
                    host,
                    port,
                    user=gw_user,
                    password=gw_pw,
                    devices=device_ids,
                    count=count,
                )
            ),
            2,
        )

        # --- ingest ---------------------------------------------------------------------
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
        child_env.update(env)
        child_env.update(
            {
                "CITYOPS_DATABASE_URL": db_url,
                "CITYOPS_INGEST_SHARE_GROUP": group,
                "CITYOPS_INGEST_MQTT_PROTOCOL": protocol,
                "CITYOPS_TOPIC_TELEMETRY": topics["telemetry"],
                "CITYOPS_TOPIC_STATUS": topics["status"],
                "CITYOPS_TOPIC_DEADLETTER": topics["deadletter"],
                "CITYOPS_METRICS_PORT": "0",
                "CITYOPS_LOG_LEVEL": "WARNING",
            }
        )
        cityops = shutil.which("cityops") or str(Path(sys.executable).with_name("cityops"))
        started = time.monotonic()
        command = ingest_command or [cityops, "ingest"]
        processes = [
            await asyncio.create_subprocess_exec(
                *command,
                env={**child_env, "CITYOPS_INGEST_CLIENT_ID": client_id},
            )
            for client_id in client_ids
        ]
        try:
            done = await _wait_count(kafka, topics["telemetry"], count, timeout_s)
            cpu_s = sum(_proc_cpu_s(process.pid) for process in processes)
            peak = max(_proc_peak_rss(process.pid) for process in processes)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                await asyncio.wait_for(process.wait(), 30)
        if done is None:
            results["ingest_error"] = "timed out"
        else:
            wall = done - started
            results["ingest_wall_s"] = round(wall, 2)
            results["ingest_msgs_per_s"] = round(count / wall)
            results["ingest_cpu_s_per_100k"] = round(cpu_s * 100_000 / count, 2)
            results["ingest_peak_rss_mb"] = round(peak / 2**20, 1)
        results["deadletter_records"] = await _topic_count(kafka, topics["deadletter"])

        # --- baseline: mosquitto_sub | kcat -P -----------------------------------------
        if baseline:
            sub = [
                "mosquitto_sub", "-h", host, "-p", str(port), "-u", ingest_user, "-P", ingest_pw,
                "-i", base_client, "-c", "-q", "1", "-t", f"$share/{base_group}/{share}",
                "-C", str(count),
            ]  # fmt: skip
            with kcat_args(kafka) as broker:
                kcat = ["kcat", "-P", *broker, "-t", topics["baseline"], "-z", "lz4"]
                read_end, write_end = os.pipe()
                started = time.monotonic()
                producer = await asyncio.create_subprocess_exec(*kcat, stdin=read_end)
                consumer = await asyncio.create_subprocess_exec(*sub, stdout=write_end)
                os.close(read_end)
                os.close(write_end)
                await asyncio.wait_for(consumer.wait(), timeout_s)
                await asyncio.wait_for(producer.wait(), timeout_s)
            done = await _wait_count(kafka, topics["baseline"], count, 60)
            if done is not None:
                wall = done - started
                results["baseline_wall_s"] = round(wall, 2)
                results["baseline_msgs_per_s"] = round(count / wall)
                if "ingest_msgs_per_s" in results:
                    results["ratio_to_baseline"] = round(
                        results["ingest_msgs_per_s"] / results["baseline_msgs_per_s"], 3
                    )
    finally:
        for cid in (*client_ids, base_client):
            await asyncio.to_thread(
                functools.partial(
                    purge_session,
                    host=host,
                    port=port,
                    username=ingest_user,
                    password=ingest_pw,
                    client_id=cid,
                )
            )
        with contextlib.suppress(Exception):
            await admin_kafka.delete_topics(list(topics.values()))
        await admin_kafka.close()
        await drop_database(admin_db, db_name)
        await admin_db.close()
    return results


def main() -> None:
    """`python -m bench.ingest [count] [protocol] [replicas]` with the stack's env."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    protocol = sys.argv[2] if len(sys.argv) > 2 else "3.1.1"
    replicas = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    env = {k: v for k, v in os.environ.items() if k.startswith("CITYOPS_")}
    profile = os.environ.get("INGEST_BENCH_PROFILE")  # a path: run ingest under cProfile
    command = (
        [sys.executable, "-m", "cProfile", "-o", profile, "-m", "cityops.cli", "ingest"]
        if profile
        else None
    )
    result = asyncio.run(
        run_ingest_bench(
            env,
            count=count,
            protocol=protocol,
            baseline=not profile,
            ingest_command=command,
            replicas=replicas,
        )
    )
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
