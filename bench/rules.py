"""Rules drain benchmark: a pre-filled `city.telemetry.v1`, then `cityops rules` started; time
until its group has committed the end of every partition (tickets and state written).

Same run, same topic, baseline: `kcat -C` reading the topic end to end (no parsing, no rules,
no database). A second phase spreads the readings over 100k devices to measure the memory of
that many devices' state. `run_rules_bench()` returns the numbers for `make bench`;
`python -m bench.rules [--quick]` prints them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    NotCoordinatorForGroupError,
)
from aiokafka.structs import TopicPartition

from cityops.common.kafka import (
    KafkaAccess,
    kafka_admin,
    kafka_consumer,
    kcat_args,
    scratch_topic,
)
from cityops.common.kinds import Kind
from cityops.common.migrate import apply_migrations
from cityops.common.registry import Device, upsert_devices
from cityops.common.scratch import drop_database

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_KINDS = (Kind.WASTEBIN, Kind.STREETLIGHT, Kind.MANHOLE, Kind.PARKING)
PARTITIONS = 12


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _proc_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fields(kind: Kind, device: int, seq: int) -> dict[str, Any]:
    """A fleet where most readings change nothing and a few raise and clear tickets."""
    if kind is Kind.WASTEBIN:
        fill = (seq * 3 + device) % 100  # fills up, crosses 90 (bin_full), gets emptied
        return {"fill_pct": float(fill), "temperature_c": 14.0, "battery_pct": 80.0}
    if kind is Kind.STREETLIGHT:
        fault = "driver_fault" if device % 100 == 0 and seq % 20 < 10 else "none"
        return {"lamp_on": True, "fault": fault, "power_w": 38.5}
    if kind is Kind.MANHOLE:
        return {"cover_open": False, "water_level_pct": 20.0 + device % 7, "gas_ppm": 1.0}
    return {"occupied": (seq // 10 + device) % 2 == 0, "battery_pct": 90.0}


def _lines(devices: int, per_device: int, start: datetime) -> Iterator[bytes]:
    """`key<TAB>value` lines for kcat -P, in the normalised city.telemetry.v1 format."""
    received = start.isoformat()
    for seq in range(1, per_device + 1):
        ts = (start + timedelta(seconds=seq)).isoformat()
        for device in range(devices):
            kind = _KINDS[device % 4]
            device_id = f"bench-{kind.value[:2]}-{device:06d}"
            body = {"device_id": device_id, "kind": kind.value, "ts": ts, "seq": seq}
            body.update(_fields(kind, device, seq))
            body["received_at"] = received
            body["ingest_id"] = "bench"
            yield device_id.encode() + b"\t" + orjson.dumps(body) + b"\n"


async def _prefill(kafka: KafkaAccess, topic: str, devices: int, per_device: int) -> float:
    started = time.monotonic()
    with kcat_args(kafka) as broker:
        process = await asyncio.create_subprocess_exec(
            "kcat", "-P", *broker, "-t", topic, "-K", "\t", "-z", "lz4",
            "-X", "partitioner=murmur2_random",  # the Java/aiokafka partitioner, like ingest
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdin is not None
        chunk: list[bytes] = []
        for line in _lines(devices, per_device, datetime.now(UTC)):
            chunk.append(line)
            if len(chunk) >= 20_000:
                process.stdin.write(b"".join(chunk))
                await process.stdin.drain()
                chunk.clear()
        process.stdin.write(b"".join(chunk))
        await process.stdin.drain()
        process.stdin.close()
        if await process.wait() != 0:
            raise RuntimeError("kcat -P failed")
    return time.monotonic() - started


async def _kcat_consume(kafka: KafkaAccess, topic: str) -> float:
    started = time.monotonic()
    with kcat_args(kafka) as broker:
        process = await asyncio.create_subprocess_exec(
            "kcat", "-C", *broker, "-t", topic, "-o", "beginning", "-e", "-q",
            "-f", "%k %s\n", stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await process.wait() != 0:
            raise RuntimeError("kcat -C failed")
    return time.monotonic() - started


async def _end_offsets(kafka: KafkaAccess, topic: str) -> dict[TopicPartition, int]:
    consumer = kafka_consumer(kafka)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def _committed(
    admin: AIOKafkaAdminClient, group: str, ends: Mapping[TopicPartition, int]
) -> tuple[int, bool]:
    """Records the group has committed, and whether that is the end of every partition."""
    try:
        committed = await admin.list_consumer_group_offsets(group)
    except (
        GroupCoordinatorNotAvailableError,
        NotCoordinatorForGroupError,
        GroupLoadInProgressError,
    ):
        # A fresh broker is still creating __consumer_offsets, or the group has no coordinator
        # yet: nothing committed so far (a full `make bench` on a new stack lost a run to this).
        return 0, False
    offsets = {tp: meta.offset for tp, meta in committed.items() if tp in ends and meta.offset >= 0}
    done = all(offsets.get(tp, -1) >= end for tp, end in ends.items())
    return sum(offsets.values()), done


async def _drain(
    env: Mapping[str, str],
    *,
    db_url: str,
    topics: Mapping[str, str],
    admin: AIOKafkaAdminClient,
    timeout_s: float,
) -> dict[str, Any]:
    group = f"rules-bench-{uuid.uuid4().hex[:8]}"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    child_env.update(env)
    child_env.update(
        {
            "CITYOPS_DATABASE_URL": db_url,
            "CITYOPS_TOPIC_TELEMETRY": topics["telemetry"],
            "CITYOPS_TOPIC_STATUS": topics["status"],
            "CITYOPS_TOPIC_TICKETS": topics["tickets"],
            "CITYOPS_RULES_GROUP": group,
            "CITYOPS_METRICS_PORT": str(_free_port()),
            "CITYOPS_LOG_LEVEL": "WARNING",
        }
    )
    ends = await _end_offsets(KafkaAccess.from_env(env, principal="admin"), topics["telemetry"])
    total = sum(ends.values())
    cityops = shutil.which("cityops") or str(Path(sys.executable).with_name("cityops"))
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(cityops, "rules", env=child_env)
    try:
        deadline = started + timeout_s
        first: tuple[float, int] | None = None  # steady state: from the first commit
        while True:
            count, done = await _committed(admin, group, ends)
            if done:
                break
            if first is None and count > 0:
                first = (time.monotonic(), count)
            if time.monotonic() > deadline or process.returncode is not None:
                return {"error": "timed out" if process.returncode is None else "exited"}
            await asyncio.sleep(0.1)  # polling a benchmark's finish line, not service logic
        finished = time.monotonic()
        elapsed = finished - started
        cpu_s = _proc_cpu_s(process.pid)
        rss_kb = _proc_kb(process.pid, "VmRSS")
        peak_kb = _proc_kb(process.pid, "VmHWM")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)
    return {
        "events": total,
        "wall_s": round(elapsed, 2),
        "events_per_s": round(total / elapsed),
        "steady_events_per_s": (
            round((total - first[1]) / (finished - first[0])) if first is not None else None
        ),
        "startup_s": round(first[0] - started, 2) if first is not None else None,
        "cpu_s": round(cpu_s, 2),
        "cpu_us_per_event": round(cpu_s / total * 1e6, 1),
        "rss_mb": round(rss_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


async def _phase(
    env: Mapping[str, str],
    admin_db: asyncpg.Connection,
    admin_kafka: AIOKafkaAdminClient,
    *,
    devices: int,
    per_device: int,
    baseline: bool,
    timeout_s: float,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    kafka = KafkaAccess.from_env(env, principal="admin")
    db_name = f"bench_rules_{tag}"
    base = env["CITYOPS_DATABASE_URL"]
    db_url = urlunsplit(urlsplit(base)._replace(path=f"/{db_name}"))
    topics = {
        name: scratch_topic(name, f"bench-rules-{tag}")
        for name in ("telemetry", "status", "tickets")
    }
    await admin_db.execute(f'CREATE DATABASE "{db_name}"')
    try:
        conn = await asyncpg.connect(db_url)
        try:
            await apply_migrations(conn)
            registry = [
                Device(
                    device_id=f"bench-{_KINDS[i % 4].value[:2]}-{i:06d}",
                    kind=_KINDS[i % 4],
                    district=f"district-{i % 8}",
                    reporting_interval_s=3600,
                )
                for i in range(devices)
            ]
            for start in range(0, len(registry), 10_000):
                await upsert_devices(conn, devices=registry[start : start + 10_000])
        finally:
            await conn.close()
        await admin_kafka.create_topics(
            [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics.values()]
        )
        result: dict[str, Any] = {"devices": devices, "readings": devices * per_device}
        prefill_s = await _prefill(kafka, topics["telemetry"], devices, per_device)
        result["prefill_s"] = round(prefill_s, 2)
        if baseline:
            kcat_s = await _kcat_consume(kafka, topics["telemetry"])
            result["baseline_kcat_wall_s"] = round(kcat_s, 2)
            result["baseline_kcat_events_per_s"] = round(devices * per_device / kcat_s)
        result.update(
            await _drain(env, db_url=db_url, topics=topics, admin=admin_kafka, timeout_s=timeout_s)
        )
        conn = await asyncpg.connect(db_url)
        try:
            result["tickets"] = await conn.fetchval("SELECT count(*) FROM tickets")
            result["open_tickets"] = await conn.fetchval(
                "SELECT count(*) FROM tickets WHERE status = 'open'"
            )
            result["transitions"] = await conn.fetchval("SELECT count(*) FROM ticket_transitions")
            result["state_rows"] = await conn.fetchval("SELECT count(*) FROM rule_state")
        finally:
            await conn.close()
        return result
    finally:
        await admin_kafka.delete_topics(list(topics.values()))
        await drop_database(admin_db, db_name)


async def run_rules_bench(
    env: Mapping[str, str], *, quick: bool = False, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Drain rate of the rules service vs `kcat -C` on the same pre-filled topic, and its RSS."""
    admin_db = await asyncpg.connect(env["CITYOPS_DATABASE_URL"])
    admin_kafka = kafka_admin(KafkaAccess.from_env(env, principal="admin"))
    await admin_kafka.start()
    results: dict[str, Any] = {}
    try:
        devices, per_device = (2_000, 25) if quick else (10_000, 50)
        drain = await _phase(
            env, admin_db, admin_kafka, devices=devices, per_device=per_device,
            baseline=True, timeout_s=timeout_s,
        )  # fmt: skip
        results.update(drain)
        if "events_per_s" in drain:
            results["ratio_to_baseline"] = round(
                drain["events_per_s"] / drain["baseline_kcat_events_per_s"], 3
            )
        if not quick:
            wide = await _phase(
                env, admin_db, admin_kafka, devices=100_000, per_device=5,
                baseline=False, timeout_s=timeout_s,
            )  # fmt: skip
            results.update({f"wide_{key}": value for key, value in wide.items()})
    finally:
        await admin_kafka.close()
        await admin_db.close()
    return results


def main() -> None:
    """`python -m bench.rules [--quick]`: print the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("CITYOPS_")}
    results = asyncio.run(run_rules_bench(env, quick=args.quick))
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
