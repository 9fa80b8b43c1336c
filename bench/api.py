"""API benchmark: read latency at a fixed request rate with 100k devices, and projector drain.

`run_api_bench(env, quick=...)` (the `api` suite of `make bench`) builds a fresh database, registers
the fleet (COPY), drains readings for every device through the real projector from Kafka
(state + history + connectivity) and, in the same run, COPYs the same rows into a plain
table as the baseline. Then it starts `cityops api` as a process (projector off) and drives
it open-loop at a fixed rate from this process: latency is measured from each request's
scheduled time, so a slow server cannot hide queueing (no coordinated omission).
`python -m bench.api [--quick]` prints the numbers as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
from aiokafka.admin import NewTopic
from prometheus_client import CollectorRegistry

from cityops.api.metrics import create_metrics
from cityops.api.projector.consumer import Projector
from cityops.common.kafka import KafkaAccess, kafka_admin, kafka_producer, scratch_topic
from cityops.common.kinds import Kind
from cityops.common.migrate import apply_migrations
from cityops.common.scratch import drop_database
from cityops.common.setaside import SetAside

KINDS = ("streetlight", "manhole", "wastebin", "parking")
DISTRICTS = 20
HISTORY_DEVICES = 200  # devices with 24 h of 5-minute history for the bucket query
_CITYOPS = Path(sys.executable).with_name("cityops")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def _values(kind: str, n: int) -> dict[str, Any]:
    if kind == "streetlight":
        return {"lamp_on": n % 2 == 0, "fault": "lamp_failure" if n % 50 == 0 else "none"}
    if kind == "manhole":
        return {"cover_open": n % 97 == 0, "water_level_pct": float(n % 100)}
    if kind == "wastebin":
        return {"fill_pct": float(n % 101), "temperature_c": 15.0}
    return {"occupied": n % 3 == 0}


def _device(n: int) -> tuple[str, str, str, float, float]:
    kind = KINDS[n % 4]
    return (
        f"dev-{n:06d}",
        kind,
        f"district-{n // 4 % DISTRICTS:02d}",  # every kind in every district
        # scattered deterministically over 0.35 x 0.55 degrees around Berlin
        52.3 + (n * 7919 % 35_000) / 100_000,
        13.1 + (n * 104_729 % 55_000) / 100_000,
    )


@contextlib.asynccontextmanager
async def _database(base_url: str, name: str) -> AsyncIterator[str]:
    parts = urlsplit(base_url)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            conn = await asyncpg.connect(url)
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()
            yield url
        finally:
            await drop_database(admin, name)
    finally:
        await admin.close()


async def _seed(url: str, *, devices: int, now: datetime) -> None:
    conn = await asyncpg.connect(url, server_settings={"timezone": "UTC"})
    try:
        today = now.date()
        await conn.execute(
            "SELECT cityops_ensure_reading_partitions($1::date, 5)", today - timedelta(days=2)
        )
        await conn.copy_records_to_table(
            "devices",
            records=[_device(n) for n in range(devices)],
            columns=["device_id", "kind", "district", "lat", "lon"],
        )
        # 24 h of 5-minute history for a few wastebins (the bucketed readings query).
        await conn.execute(
            """
            INSERT INTO readings (device_id, kind, seq, ts, received_at, reading)
            SELECT d.device_id, 'wastebin', 1000000 + i, $1::timestamptz - i * interval '5 min',
                   $1::timestamptz - i * interval '5 min',
                   jsonb_build_object('fill_pct', (i % 100)::float8)
            FROM (SELECT device_id FROM devices WHERE kind = 'wastebin'
                  ORDER BY device_id LIMIT $2) d,
                 generate_series(1, 288) i
            """,
            now,
            HISTORY_DEVICES,
        )
        # As autovacuum would: statistics, and the visibility map for index-only scans.
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def _records(devices: int, per_device: int, now: datetime) -> list[tuple[str, bytes]]:
    records = []
    received = now.isoformat()
    for round_ in range(per_device):
        ts = (now - timedelta(seconds=per_device - round_)).isoformat()
        for n in range(devices):
            device_id, kind = f"dev-{n:06d}", KINDS[n % 4]
            body = {
                "device_id": device_id,
                "kind": kind,
                "ts": ts,
                "seq": round_ + 1,
                **_values(kind, n + round_),
                "received_at": received,
                "ingest_id": "bench",
            }
            records.append((device_id, orjson.dumps(body)))
    return records


async def _produce(kafka: KafkaAccess, topic: str, records: list[tuple[str, bytes]]) -> None:
    producer = kafka_producer(kafka, linger_ms=20, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, key=key.encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def _drain(
    url: str, *, kafka: KafkaAccess, topics: Mapping[str, str], total: int, tag: str
) -> dict[str, float]:
    """Run the real projector until it has committed `total` records."""
    pool = await asyncpg.create_pool(
        url, min_size=2, max_size=4, server_settings={"timezone": "UTC"}
    )
    producer = kafka_producer(kafka, acks="all")
    await producer.start()
    metrics = create_metrics(CollectorRegistry())
    projector = Projector(
        set_aside=SetAside(
            producer=producer,
            topic=topics["deadletter"],
            consumer=f"api-projector-bench-{tag}",
            counter=metrics.projector_set_aside,
        ),
        pool=pool,
        access=kafka,
        topics=[topics["telemetry"], topics["status"]],
        telemetry_topic=topics["telemetry"],
        group_id=f"api-projector-bench-{tag}",
        metrics=metrics,
        batch_max=5000,
        fetch_timeout_ms=200,
        partitions_ahead_days=3,
        retention_days=dict.fromkeys(Kind, 3650),
        maintenance_interval_s=3600,
        client_id=f"bench-{tag}",
    )
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(projector.run(stop))
    first_at, first_count = 0.0, 0
    try:
        while projector.records < total:
            if task.done():
                task.result()
                raise RuntimeError("projector stopped early")
            if not first_at and projector.records:
                first_at, first_count = time.perf_counter(), projector.records
            await asyncio.sleep(0.01)
        ended = time.perf_counter()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await pool.close()
        await producer.stop()
    steady = (total - first_count) / (ended - first_at) if ended > first_at else float("nan")
    return {
        "projector_drain_readings": total,
        "projector_drain_wall_s": round(ended - started, 2),
        "projector_drain_readings_per_s": round(steady),
        "projector_drain_batches": projector.batches,
    }


async def _copy_baseline(url: str, records: list[tuple[str, bytes]]) -> dict[str, float]:
    """COPY the same rows into a table shaped like `readings` (same primary key)."""
    rows = []
    for _, value in records:
        body = orjson.loads(value)
        received_at = datetime.fromisoformat(body.pop("received_at"))
        body.pop("ingest_id")
        rows.append(
            (
                body.pop("device_id"),
                body.pop("kind"),
                body.pop("seq"),
                datetime.fromisoformat(body.pop("ts")),
                received_at,
                orjson.dumps(body).decode(),
            )
        )
    conn = await asyncpg.connect(url, server_settings={"timezone": "UTC"})
    try:
        await conn.execute(
            "CREATE TABLE readings_copy_baseline (LIKE readings INCLUDING DEFAULTS "
            "INCLUDING CONSTRAINTS INCLUDING INDEXES)"
        )
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "readings_copy_baseline",
            records=rows,
            columns=["device_id", "kind", "seq", "ts", "received_at", "reading"],
        )
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {
        "baseline_copy_readings_per_s": round(len(rows) / elapsed),
        "baseline_copy_s": round(elapsed, 2),
    }


class _Connection:
    """A minimal HTTP/1.1 keep-alive client connection: the load generator must cost far less
    CPU than the server it measures (httpx needed ~2 ms per request here, on the same cores)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def get(self, path: str, headers: bytes) -> int:
        """GET `path`; returns the status code after reading the whole body."""
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + headers + b"\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _open_loop(
    base: str,
    key: str,
    make_path: Callable[[random.Random], str],
    *,
    rate: float,
    duration_s: float,
    seed: int,
    max_connections: int = 128,
) -> dict[str, float]:
    """Send `rate` requests/s for `duration_s`; latency from each scheduled send time."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = f"Host: {host}\r\nAuthorization: Bearer {key}\r\n".encode()
    rng = random.Random(seed)  # noqa: S311 - load pattern, not security
    count = int(rate * duration_s)
    paths = [make_path(rng) for _ in range(count)]
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    opened = 0
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(scheduled: float, path: str) -> None:
        nonlocal errors, opened
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle.empty() and opened < max_connections:
            opened += 1
            connection = await _Connection.open(host, port)
        else:
            connection = await idle.get()
        try:
            if await connection.get(path, headers) != 200:
                errors += 1
            idle.put_nowait(connection)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            connection.close()
            opened -= 1
        latencies.append((loop.time() - scheduled) * 1000)

    await asyncio.gather(*(one(start + i / rate, path) for i, path in enumerate(paths)))
    elapsed = loop.time() - start
    while not idle.empty():
        idle.get_nowait().close()
    return {
        "p50_ms": round(_percentile(latencies, 50), 2),
        "p99_ms": round(_percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "req_per_s": round(count / elapsed, 1),
        "errors": errors,
    }


async def _max_throughput(
    base: str, key: str, make_path: Callable[[random.Random], str], *, seconds: float
) -> float:
    """Closed loop, 16 connections: how many device reads per second at most."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = f"Host: {host}\r\nAuthorization: Bearer {key}\r\n".encode()
    rng = random.Random(7)  # noqa: S311
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        connection = await _Connection.open(host, port)
        try:
            while time.perf_counter() < deadline:
                await connection.get(make_path(rng), headers)
                done += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    return round(done / (time.perf_counter() - started))


@contextlib.contextmanager
def _quiet_collector() -> Iterator[list[float]]:
    """Keep this process's garbage collector from pausing the load generator; yields the
    durations (ms) of the full collections that still happen inside.

    Latency is measured from each request's scheduled time, so a pause of the load generator
    counts as server latency: before this, the bench process (holding the drained records, the
    Kafka client and the projector's modules) ran ~18 full collections of 13-131 ms per run.
    Everything alive now is frozen out of the collector's reach until the block ends.
    """
    pauses: list[float] = []
    started = 0.0

    def callback(phase: str, info: Mapping[str, int]) -> None:
        nonlocal started
        if info["generation"] != 2:
            return
        if phase == "start":
            started = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - started) * 1000)

    gc.collect()
    gc.freeze()
    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()


@contextlib.asynccontextmanager
async def _api_process(env: Mapping[str, str]) -> AsyncIterator[str]:
    port = _free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full_env.update(env)
    full_env.update(
        CITYOPS_API_PORT=str(port),
        CITYOPS_API_PROJECTOR_ENABLED="false",
        CITYOPS_LOG_LEVEL="WARNING",
        CITYOPS_DATABASE_POOL_MIN="10",
        CITYOPS_DATABASE_POOL_MAX="10",
    )
    process = subprocess.Popen(  # noqa: S603, ASYNC220 - our own console script, starts at once
        [str(_CITYOPS), "api"], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as probe:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get("/readyz")).status_code == 200:
                        break
                if process.poll() is not None:
                    raise RuntimeError("cityops api exited during start-up")
                await asyncio.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _topics(kafka: KafkaAccess, tag: str) -> dict[str, str]:
    names = {
        name: scratch_topic(name, f"bench-api-{tag}")
        for name in ("telemetry", "status", "tickets", "devices", "deadletter")
    }
    admin = kafka_admin(kafka)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=12, replication_factor=1) for name in names.values()]
        )
    finally:
        await admin.close()
    return names


async def _delete_topics(kafka: KafkaAccess, names: list[str]) -> None:
    admin = kafka_admin(kafka)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


def _bbox_path(rng: random.Random) -> str:
    """A 0.02 x 0.02 degree box (about 1.4 x 2.2 km) somewhere over the fleet."""
    lon, lat = 13.1 + rng.random() * 0.53, 52.3 + rng.random() * 0.33
    return f"/v1/devices?limit=100&bbox={lon:.4f},{lat:.4f},{lon + 0.02:.4f},{lat + 0.02:.4f}"


async def _reads(
    base: str, key: str, *, devices: int, rate: float, duration_s: float
) -> dict[str, Any]:
    history = [f"dev-{n:06d}" for n in range(2, devices, 4)][:HISTORY_DEVICES]
    scenarios: dict[str, Callable[[random.Random], str]] = {
        "device": lambda r: f"/v1/devices/dev-{r.randrange(devices):06d}",
        "list": lambda r: (
            f"/v1/devices?kind={r.choice(KINDS)}&district=district-{r.randrange(DISTRICTS):02d}"
            "&limit=100"
        ),
        "bbox": _bbox_path,
        "readings_24h": lambda r: (
            f"/v1/devices/{r.choice(history)}/readings?field=fill_pct&bucket=15m"
        ),
        "district_summary": lambda r: (
            f"/v1/districts/district-{r.randrange(DISTRICTS):02d}/summary"
        ),
    }
    results: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        for path in ("/v1/devices/dev-000001", "/v1/districts/district-01/summary"):
            response = await client.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        warm_rng = random.Random(1)  # noqa: S311
        for make_path in scenarios.values():
            for _ in range(20):  # warm connections and caches
                await client.get(make_path(warm_rng))
        # Steady state of a dashboard: every district's summary computed once (the first
        # request of a district computes it, ~30-50 ms at 100k devices; later ones are cached).
        for district in range(DISTRICTS):
            await client.get(f"/v1/districts/district-{district:02d}/summary")
    for name, make_path in scenarios.items():
        measured = await _open_loop(base, key, make_path, rate=rate, duration_s=duration_s, seed=3)
        for metric, value in measured.items():
            results[f"{name}_{metric}"] = value
    results["device_max_req_per_s"] = await _max_throughput(
        base, key, scenarios["device"], seconds=min(duration_s, 10)
    )
    return results


async def _import(base: str, key: str, *, count: int) -> dict[str, float]:
    """POST /v1/devices:import of `count` new devices (CSV); credentials included."""
    lines = ["device_id,kind,district,lat,lon"]
    lines += [
        f"imp-{n:06d},{KINDS[n % 4]},district-{n % DISTRICTS:02d},52.5,13.4" for n in range(count)
    ]
    body = "\n".join(lines).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/csv"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as client:
        started = time.perf_counter()
        response = await client.post("/v1/devices:import", content=body)
        elapsed = time.perf_counter() - started
    if response.status_code != 200 or response.json()["created"] != count:
        raise RuntimeError(f"import failed: {response.status_code} {response.text[:300]}")
    return {"import_devices": count, "import_s": round(elapsed, 2)}


async def _import_health(base: str, key: str, *, rows: int) -> dict[str, float]:
    """/healthz, probed every 20 ms while a `rows`-row import of refused rows is parsed: the
    parsing must not hold the event loop (target: every probe under 100 ms)."""
    body = b"".join(
        b'{"device_id": "bad id %d", "kind": "wastebin", "district": "north"}\n' % n
        for n in range(rows)
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    latencies: list[float] = []
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as importer,
        httpx.AsyncClient(base_url=base, timeout=30) as prober,
    ):
        await prober.get("/healthz")  # a warm keep-alive connection
        started = time.perf_counter()
        upload = asyncio.create_task(importer.post("/v1/devices:import", content=body))
        while not upload.done():
            sent = time.perf_counter()
            if (await prober.get("/healthz")).status_code != 200:
                raise RuntimeError("/healthz failed during the import")
            latencies.append((time.perf_counter() - sent) * 1000)
            await asyncio.sleep(0.02)
        response = await upload
        elapsed = time.perf_counter() - started
    if response.status_code != 200 or response.json()["failed"] != rows:
        raise RuntimeError(f"bad import: {response.status_code} {response.text[:300]}")
    return {
        "import_bad_rows": rows,
        "import_bad_s": round(elapsed, 2),
        "import_health_probes": len(latencies),
        "import_health_p50_ms": round(_percentile(latencies, 50), 1),
        "import_health_p99_ms": round(_percentile(latencies, 99), 1),
        "import_health_max_ms": round(max(latencies, default=float("nan")), 1),
    }


async def run_api_bench(
    env: Mapping[str, str],
    *,
    quick: bool = False,
    devices: int | None = None,
    rate: float = 200.0,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """The API suite: drain into state + history vs COPY, then reads at `rate` requests/s."""
    devices = devices or (10_000 if quick else 100_000)
    duration_s = duration_s or (5.0 if quick else 20.0)
    per_device = 2
    tag = uuid.uuid4().hex[:8]
    kafka = KafkaAccess.from_env(env, principal="admin")
    key = f"bench-{uuid.uuid4().hex}"
    now = datetime.now(UTC).replace(microsecond=0)
    results: dict[str, Any] = {"devices": devices, "rate_target_req_per_s": rate}
    topics = await _topics(kafka, tag)
    try:
        async with _database(env["CITYOPS_DATABASE_URL"], f"bench_api_{tag}") as url:
            await _seed(url, devices=devices, now=now)
            records = _records(devices, per_device, now)
            await _produce(kafka, topics["telemetry"], records)
            results.update(
                await _drain(url, kafka=kafka, topics=topics, total=len(records), tag=tag)
            )
            results.update(await _copy_baseline(url, records))
            results["ratio_to_baseline"] = round(
                results["projector_drain_readings_per_s"] / results["baseline_copy_readings_per_s"],
                3,
            )
            api_env = {
                "CITYOPS_DATABASE_URL": url,
                **kafka.env(),
                "CITYOPS_API_BOOTSTRAP_KEY": key,
                **{f"CITYOPS_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
            }
            # Provisioning writes a private devices file (no broker reads it): the cost
            # measured is hashing, the database and the atomic file writes.
            with tempfile.TemporaryDirectory(prefix="cityops-api-bench-") as folder:
                api_env["CITYOPS_MQTT_DEVICE_PASSWORD_FILE"] = str(Path(folder) / "devices.passwd")
                records.clear()  # the load generator keeps nothing it does not need
                async with _api_process(api_env) as base:
                    with _quiet_collector() as pauses:
                        results.update(
                            await _reads(
                                base, key, devices=devices, rate=rate, duration_s=duration_s
                            )
                        )
                    results["loadgen_full_gc_count"] = len(pauses)
                    results["loadgen_full_gc_max_ms"] = round(max(pauses, default=0.0), 1)
                    results.update(await _import(base, key, count=10_000))
                    results.update(await _import_health(base, key, rows=100_000))
    finally:
        await _delete_topics(kafka, list(topics.values()))
    return results


def main() -> None:
    """Print the suite's numbers as JSON (env from the process, e.g. .stack/cityops.env)."""
    quick = "--quick" in sys.argv
    env = {k: v for k, v in os.environ.items() if k.startswith("CITYOPS_")}
    result = asyncio.run(run_api_bench(env, quick=quick))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
