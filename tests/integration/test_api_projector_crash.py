"""kill -9 of `cityops api` mid-stream: the read model loses and duplicates nothing.

The projector commits offsets after the write, at most once per commit interval, so a crash
leaves records that are written but not committed; the next process replays them and the
idempotent writes absorb the replay. This test makes both halves happen for real:

1. While readings stream in, a lock stalls one batch's write for longer than the commit
   interval. Every record below the committed offsets must already be in PostgreSQL then (a
   projector that committed before writing fails here).
2. After the stall, the process is frozen (SIGSTOP) at a moment where PostgreSQL holds rows
   whose offsets are not committed, and killed with SIGKILL.
3. A new process in the same group replays from the committed offsets; afterwards every
   distinct reading is in `readings` exactly once, `device_state` holds each device's highest
   seq and `device_connectivity` the newest fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cityops.common.events import StatusEvent, encode_status, encode_telemetry, parse_reading
from cityops.common.kafka import kafka_admin, kafka_producer
from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.api_support import BASE_TOPICS
from tests.integration.ingest_support import free_port
from tests.integration.kafka_support import StackKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

CITYOPS = Path(sys.executable).with_name("cityops")
KINDS = ("streetlight", "manhole", "wastebin", "parking")
DEVICES_PER_KIND = 80
SEQS = 8  # every device's readings are seq 1..SEQS, sent shuffled, some twice
ROUND_PAUSE_S = 0.5  # one message per device per round
COMMIT_INTERVAL_S = 2.0

ReadingKey = tuple[str, datetime, int]


@dataclass(frozen=True)
class Message:
    """One record the test produces, and where Kafka put it."""

    topic: str  # "telemetry" or "status"
    device_id: str
    received_at: datetime
    online: bool  # a reading means online
    reading: ReadingKey | None = None
    partition: int = -1
    offset: int = -1


def kind_values(kind: str, seq: int) -> dict[str, Any]:
    """A reading's measured values: they change with seq, so device_state shows which won."""
    measured: dict[str, dict[str, Any]] = {
        "streetlight": {"lamp_on": seq % 2 == 0},
        "manhole": {"cover_open": seq % 2 == 1},
        "wastebin": {"fill_pct": seq * 10.0},
        "parking": {"occupied": seq % 2 == 0},
    }
    return {"battery_pct": 100.0 - seq, **measured[kind]}


def plan_rounds(devices: Mapping[str, str], t0: datetime, base: datetime) -> list[list[Message]]:
    """Each device's messages in send order, one per round.

    Some devices send pairs of seqs swapped (so their last reading is not their newest), some
    repeat earlier readings, some send an offline status (a few of those come back online, the
    others end offline and then get a stale "online" from an hour ago that must not win).
    """
    rng = random.Random(20241126)  # fixed seed: the same plan every run
    orders: dict[str, list[int | str]] = {}
    for i, device_id in enumerate(devices):
        seqs: list[int | str] = list(range(1, SEQS + 1))
        if i % 4 == 1:
            for j in range(0, SEQS - 1, 2):
                seqs[j], seqs[j + 1] = seqs[j + 1], seqs[j]
        if i % 3 == 0:
            for _ in range(3):
                pos = rng.randrange(1, len(seqs) + 1)
                seqs.insert(pos, rng.choice([s for s in seqs[:pos] if isinstance(s, int)]))
        if i % 5 == 0:
            if i % 10 == 0:
                seqs.extend(["offline", "stale-online"])
            else:
                seqs.insert(rng.randrange(1, len(seqs)), "offline")
        orders[device_id] = seqs
    rounds: list[list[Message]] = []
    index = 0
    for r in range(max(len(o) for o in orders.values())):
        batch: list[Message] = []
        for device_id, order in orders.items():
            if r >= len(order):
                continue
            step = order[r]
            index += 1
            received_at = base + timedelta(milliseconds=index)  # distinct: no ties
            if step == "offline":
                batch.append(Message("status", device_id, received_at, online=False))
            elif step == "stale-online":
                stale = base - timedelta(hours=1) + timedelta(milliseconds=index)
                batch.append(Message("status", device_id, stale, online=True))
            else:
                assert isinstance(step, int)
                key = (device_id, t0 + timedelta(minutes=step), step)
                batch.append(Message("telemetry", device_id, received_at, True, key))
        rounds.append(batch)
    return rounds


def encode(message: Message, kind: str) -> bytes:
    """The record value as ingest writes it."""
    if message.reading is None:
        event = StatusEvent(
            device_id=message.device_id,
            kind=Kind(kind),
            online=message.online,
            received_at=message.received_at,
            ingest_id="crash-test",
        )
        return encode_status(event)
    _, ts, seq = message.reading
    body = {"device_id": message.device_id, "kind": kind, "seq": seq, "ts": ts.isoformat()}
    reading = parse_reading(json.dumps({**body, **kind_values(kind, seq)}))
    return encode_telemetry(reading, received_at=message.received_at, ingest_id="crash-test")


def spawn(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`cityops api` as a process of its own, with exactly these CITYOPS_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full_env.update(env)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [str(CITYOPS), "api"], env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )


async def wait_ready(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

        async def ready() -> bool:
            try:
                return (await http.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(ready, timeout=30, interval=0.2, message="api ready")


async def projector_metrics(port: int) -> dict[str, float]:
    """This process's projector counters, summed over their labels."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("cityops_api_projector_"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def reading_keys(conn: asyncpg.Connection) -> set[ReadingKey]:
    rows = await conn.fetch("SELECT device_id, ts, seq FROM readings")
    return {(r["device_id"], r["ts"], r["seq"]) for r in rows}


def committed_but_missing(
    sent: list[Message],
    committed: Mapping[tuple[str, int], int],
    in_db: set[ReadingKey],
    status_at: Mapping[str, datetime],
) -> list[Message]:
    """Records below the committed offsets whose effect is not in PostgreSQL."""
    missing = []
    for m in sent:
        if m.offset >= committed.get((m.topic, m.partition), 0):
            continue
        if m.reading is not None:
            if m.reading not in in_db:
                missing.append(m)
        elif m.device_id not in status_at or status_at[m.device_id] < m.received_at:
            missing.append(m)
    return missing


def written_uncommitted(
    sent: list[Message], committed: Mapping[tuple[str, int], int], in_db: set[ReadingKey]
) -> set[ReadingKey]:
    """Readings in PostgreSQL that only records at or above the committed offsets carry."""
    below = {
        m.reading
        for m in sent
        if m.reading is not None and m.offset < committed.get((m.topic, m.partition), 0)
    }
    return {m.reading for m in sent if m.reading in in_db and m.reading not in below}


async def test_kill_9_mid_stream_projects_every_reading_once(
    kafka: StackKafka,
    kafka_topics: Any,
    database_url: str,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    topics = await kafka_topics(*BASE_TOPICS, partitions=3)
    real = {"telemetry": topics["city.telemetry.v1"], "status": topics["city.status.v1"]}
    base_of = {name: base for base, name in real.items()}
    group = f"api-projector-crash-{tag}"
    env = {
        **kafka.service("api").env(),
        "CITYOPS_DATABASE_URL": database_url,
        "CITYOPS_TOPIC_TELEMETRY": topics["city.telemetry.v1"],
        "CITYOPS_TOPIC_STATUS": topics["city.status.v1"],
        "CITYOPS_TOPIC_DEADLETTER": topics["city.deadletter.v1"],
        "CITYOPS_TOPIC_TICKETS": topics["city.tickets.v1"],
        "CITYOPS_TOPIC_DEVICES": topics["city.devices.v1"],
        "CITYOPS_TOPIC_PARTITIONS": "3",
        "CITYOPS_API_BOOTSTRAP_KEY": f"key-{uuid.uuid4().hex}",
        "CITYOPS_API_PROJECTOR_GROUP": group,
        "CITYOPS_API_PROJECTOR_BATCH_MAX": "50",
        "CITYOPS_API_PROJECTOR_FETCH_TIMEOUT_MS": "100",
        "CITYOPS_API_PROJECTOR_COMMIT_INTERVAL_MS": str(int(COMMIT_INTERVAL_S * 1000)),
        "CITYOPS_SHUTDOWN_TIMEOUT_S": "5",
        "CITYOPS_LOG_FORMAT": "json",
    }
    devices = {
        f"{kind[:2]}-crash-{tag}-{i:03d}": kind for kind in KINDS for i in range(DEVICES_PER_KIND)
    }
    now = datetime.now(UTC).replace(microsecond=0)
    rounds = plan_rounds(devices, t0=now - timedelta(hours=1), base=now - timedelta(minutes=5))
    everything = [m for batch in rounds for m in batch]
    expected_readings = {m.reading for m in everything if m.reading is not None}
    newest_fact: dict[str, Message] = {}
    for m in everything:
        if m.device_id not in newest_fact or m.received_at > newest_fact[m.device_id].received_at:
            newest_fact[m.device_id] = m
    assert len(expected_readings) == len(devices) * SEQS
    assert {m.online for m in newest_fact.values()} == {True, False}

    db = await asyncpg.connect(database_url)
    admin = kafka_admin(kafka.admin)
    await admin.start()
    producer = kafka_producer(kafka.admin, acks="all", linger_ms=5)
    await producer.start()
    sent: list[Message] = []

    async def stream() -> None:
        for batch in rounds:
            futures = [
                await producer.send(
                    real[m.topic], encode(m, devices[m.device_id]), key=m.device_id.encode()
                )
                for m in batch
            ]
            for m, future in zip(batch, futures, strict=True):
                meta = await future
                sent.append(dataclasses.replace(m, partition=meta.partition, offset=meta.offset))
            await asyncio.sleep(ROUND_PAUSE_S)

    async def committed_offsets() -> dict[tuple[str, int], int]:
        offsets = await admin.list_consumer_group_offsets(group)
        return {(base_of[tp.topic], tp.partition): o.offset for tp, o in offsets.items()}

    async def connectivity() -> dict[str, datetime]:
        rows = await db.fetch("SELECT device_id, status_at FROM device_connectivity")
        return {r["device_id"]: r["status_at"] for r in rows}

    processes: list[subprocess.Popen[bytes]] = []
    producing: asyncio.Task[None] | None = None
    try:
        await db.executemany(
            "INSERT INTO devices (device_id, kind, district, lat, lon) "
            "VALUES ($1, $2, 'crash', 52.5, 13.4)",
            list(devices.items()),
        )
        first_port = free_port()
        log_path = tmp_path / "api.log"
        first = spawn({**env, "CITYOPS_API_PORT": str(first_port)}, log_path)
        processes.append(first)
        await wait_ready(first_port)
        producing = asyncio.create_task(stream())

        async def some_written() -> bool:
            count: int = await db.fetchval("SELECT count(*) FROM readings")
            return 0 < count < len(expected_readings)

        await wait_for(some_written, timeout=15, message="the first readings projected")

        # 1. Stall a write for longer than the commit interval: a lock the batch's INSERT
        # INTO readings waits on. Every committed record must be in PostgreSQL meanwhile.
        locker = await asyncpg.connect(database_url)
        try:
            stall = locker.transaction()
            await stall.start()
            await locker.execute("LOCK TABLE readings IN SHARE MODE")

            async def writer_blocked() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )

            await wait_for(writer_blocked, timeout=5, message="a projector write waits on the lock")
            await asyncio.sleep(COMMIT_INTERVAL_S + 0.6)  # at least one commit tick
            during_stall = await committed_offsets()
            missing = committed_but_missing(
                list(sent), during_stall, await reading_keys(db), await connectivity()
            )
            assert during_stall, "nothing committed before the stall"
            assert not missing, (
                f"{len(missing)} records below the committed offsets are not in PostgreSQL "
                f"(offsets committed before the write), e.g. {missing[:3]}"
            )
            await stall.rollback()
        finally:
            await locker.close()
        await asyncio.sleep(0.5)  # a few batches written after the stall, not yet committed

        # 2. Freeze the process where PostgreSQL holds rows whose offsets are not committed
        # yet (between two commit ticks), then kill it.
        for _ in range(20):
            first.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.2)  # requests already sent land
            pending = written_uncommitted(
                list(sent), await committed_offsets(), await reading_keys(db)
            )
            if pending:
                break
            first.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.3)
        else:
            pytest.fail("never caught the projector with written but uncommitted readings")
        first.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
        assert not producing.done(), "the stream ended before the kill"

        async def backends_gone() -> bool:
            return not await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )

        await wait_for(backends_gone, timeout=10, message="the killed process's sessions ended")
        at_kill = await reading_keys(db)
        committed = await committed_offsets()
        replayed = written_uncommitted(list(sent), committed, at_kill)
        assert replayed, "no written-but-uncommitted readings at the kill"
        assert 0 < len(at_kill) < len(expected_readings), "the kill was not mid-stream"
        missing = committed_but_missing(list(sent), committed, at_kill, await connectivity())
        assert not missing, f"{len(missing)} committed records not in PostgreSQL at the kill"

        # 3. A new process in the same group replays from the committed offsets.
        second_port = free_port()
        processes.append(spawn({**env, "CITYOPS_API_PORT": str(second_port)}, log_path))
        await producing
        assert len(sent) == len(everything)
        await wait_ready(second_port)
        to_read = len(sent) - sum(committed.values())

        async def caught_up() -> dict[str, float] | None:
            # batch_records is observed after a batch's write: this many records are written
            metrics = await projector_metrics(second_port)
            written = metrics.get("cityops_api_projector_batch_records_sum", 0.0)
            return metrics if written >= to_read else None

        metrics = await wait_for(caught_up, timeout=25, interval=0.2, message="caught up")

        # Every distinct reading exactly once: nothing lost, nothing twice.
        rows = await db.fetch("SELECT device_id, ts, seq FROM readings")
        assert len(rows) == len(expected_readings)
        assert {(r["device_id"], r["ts"], r["seq"]) for r in rows} == expected_readings
        # The new process read everything from the committed offsets on, including readings
        # the killed one had written, and inserted exactly the ones that were missing.
        assert metrics["cityops_api_projector_records_total"] == to_read
        assert metrics.get("cityops_api_projector_invalid_records_total", 0.0) == 0
        assert metrics["cityops_api_projector_readings_written_total"] == len(
            expected_readings
        ) - len(at_kill)
        # device_state: every device at its highest seq, with that reading's values.
        states = {
            r["device_id"]: r
            for r in await db.fetch("SELECT device_id, kind, seq, reading FROM device_state")
        }
        assert set(states) == set(devices)
        for device_id, kind in devices.items():
            state = states[device_id]
            assert (state["kind"], state["seq"]) == (kind, SEQS), device_id
            assert json.loads(state["reading"]) == kind_values(kind, SEQS), device_id
        # device_connectivity: the newest fact by received_at, whatever the replay order.
        links = {
            r["device_id"]: (r["online"], r["status_at"])
            for r in await db.fetch("SELECT device_id, online, status_at FROM device_connectivity")
        }
        assert links == {d: (m.online, m.received_at) for d, m in newest_fact.items()}
    finally:
        if producing is not None and not producing.done():
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
        await producer.stop()
        await admin.close()
        await db.close()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # if a failure left it stopped
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(process.wait, 20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
