"""The projector against real Kafka and PostgreSQL: readings become state, never backwards."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from cityops.api.metrics import create_metrics
from cityops.api.projector.consumer import Projector, write_batch
from cityops.api.projector.fold import fold, telemetry_row
from cityops.common.events import StatusEvent, encode_status
from cityops.common.kafka import kafka_consumer, kafka_producer
from cityops.common.kinds import Kind
from cityops.common.setaside import SetAside
from tests.helpers import wait_for
from tests.integration.api_support import api_settings, produce, run_api, telemetry
from tests.integration.kafka_support import StackKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _add_device(database_url: str, device_id: str, kind: str, district: str = "d1") -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO devices (device_id, kind, district, lat, lon) "
            "VALUES ($1, $2, $3, 52.5, 13.4)",
            device_id,
            kind,
            district,
        )
    finally:
        await conn.close()


async def test_reading_becomes_state_and_never_moves_backwards(
    database_url: str, kafka: StackKafka, kafka_topics: Any
) -> None:
    topics = await kafka_topics(
        "city.telemetry.v1",
        "city.status.v1",
        "city.tickets.v1",
        "city.devices.v1",
        "city.deadletter.v1",
    )
    device_id = f"wb-{uuid.uuid4().hex[:8]}"
    await _add_device(database_url, device_id, "wastebin")
    settings = api_settings(database_url=database_url, kafka=kafka, topics=topics)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    async with run_api(settings) as api, api.client() as http:
        await produce(
            kafka.admin,
            topics["city.telemetry.v1"],
            [
                (
                    device_id,
                    telemetry(device_id, "wastebin", 5, t0 + timedelta(minutes=5), fill_pct=50.0),
                )
            ],
        )

        async def at_seq(seq: int) -> dict[str, Any] | None:
            response = await http.get(f"/v1/devices/{device_id}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body if body["state"] and body["state"]["seq"] == seq else None

        body = await wait_for(lambda: at_seq(5), timeout=20, message="seq 5 visible")
        assert body["state"]["values"] == {"fill_pct": 50.0}
        assert body["connectivity"]["online"] is True

        # Older (out of order) and replayed readings arrive, then a newer one.
        await produce(
            kafka.admin,
            topics["city.telemetry.v1"],
            [
                (
                    device_id,
                    telemetry(device_id, "wastebin", 3, t0 + timedelta(minutes=3), fill_pct=30.0),
                ),
                (
                    device_id,
                    telemetry(device_id, "wastebin", 5, t0 + timedelta(minutes=5), fill_pct=50.0),
                ),
                (
                    device_id,
                    telemetry(device_id, "wastebin", 4, t0 + timedelta(minutes=4), fill_pct=40.0),
                ),
            ],
        )
        await produce(
            kafka.admin,
            topics["city.telemetry.v1"],
            [
                (
                    device_id,
                    telemetry(device_id, "wastebin", 6, t0 + timedelta(minutes=6), fill_pct=93.0),
                )
            ],
        )
        body = await wait_for(lambda: at_seq(6), timeout=20, message="seq 6 visible")
        assert body["state"]["values"]["fill_pct"] == 93.0

        # History holds every distinct reading exactly once (the replay was de-duplicated).
        response = await http.get(
            f"/v1/devices/{device_id}/readings", params={"from": (t0).isoformat()}
        )
        assert response.status_code == 200, response.text
        assert [p["seq"] for p in response.json()["points"]] == [6, 5, 4, 3]

        # A status message marks it offline; an older status does not undo that.
        now = datetime.now(UTC)
        offline = StatusEvent(
            device_id=device_id, kind="wastebin", online=False, received_at=now, ingest_id="t"
        )
        stale = StatusEvent(
            device_id=device_id,
            kind="wastebin",
            online=True,
            received_at=now - timedelta(hours=1),
            ingest_id="t",
        )
        await produce(
            kafka.admin,
            topics["city.status.v1"],
            [(device_id, encode_status(offline)), (device_id, encode_status(stale))],
        )

        async def offline_now() -> bool:
            response = await http.get(f"/v1/devices/{device_id}")
            return response.json()["connectivity"]["online"] is False

        await wait_for(offline_now, timeout=20, message="offline visible")
        await produce(
            kafka.admin,
            topics["city.telemetry.v1"],
            [
                (
                    device_id,
                    telemetry(device_id, "wastebin", 7, t0 + timedelta(minutes=7), fill_pct=94.0),
                )
            ],
        )
        body = await wait_for(lambda: at_seq(7), timeout=20, message="seq 7 visible")
        assert body["connectivity"]["online"] is True  # any message means it is alive again

        metrics = (await http.get("/metrics")).text
        assert 'cityops_api_projector_records_total{source="telemetry"} 6.0' in metrics
        assert "cityops_api_projector_readings_written_total 5.0" in metrics
        assert 'route="/v1/devices/{device_id}"' in metrics  # the template, never the id
        assert device_id not in metrics


async def test_one_statement_writes_a_batch_and_a_replay_changes_nothing(
    database_url: str,
) -> None:
    a, b = f"wb-{uuid.uuid4().hex[:8]}", f"pk-{uuid.uuid4().hex[:8]}"
    await _add_device(database_url, a, "wastebin")
    await _add_device(database_url, b, "parking")
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    seen = datetime.now(UTC)

    def row(device_id: str, kind: str, seq: int, **values: Any) -> Any:
        return telemetry_row(telemetry(device_id, kind, seq, t0 + timedelta(minutes=seq), **values))

    # a's readings out of order and one replayed inside the batch; b gets a reading and then
    # an offline status that is newer than the reading.
    events = [
        row(a, "wastebin", 3, fill_pct=30.0),
        row(a, "wastebin", 5, fill_pct=50.0),
        row(a, "wastebin", 4, fill_pct=40.0),
        row(a, "wastebin", 5, fill_pct=50.0),
        row(b, "parking", 1, occupied=True),
        StatusEvent(
            device_id=b,
            kind="parking",
            online=False,
            received_at=seen + timedelta(hours=1),
            ingest_id="t",
        ),
    ]
    conn = await asyncpg.connect(database_url)
    try:
        assert await write_batch(conn, fold(events)) == (2, 4)
        states = {r["device_id"]: r["seq"] for r in await conn.fetch("SELECT * FROM device_state")}
        assert states == {a: 5, b: 1}
        rows = await conn.fetch("SELECT device_id, online FROM device_connectivity")
        online = {r["device_id"]: r["online"] for r in rows}
        assert online == {a: True, b: False}
        # The same batch again (a crash before the offset commit): nothing moves.
        assert await write_batch(conn, fold(events)) == (0, 0)
        # A late, older reading lands in history but never moves the state backwards.
        assert await write_batch(conn, fold([row(a, "wastebin", 2, fill_pct=20.0)])) == (0, 1)
        assert await conn.fetchval("SELECT seq FROM device_state WHERE device_id = $1", a) == 5
        assert await conn.fetchval("SELECT count(*) FROM readings WHERE device_id = $1", a) == 4
    finally:
        await conn.close()


async def test_partitions_ahead_and_per_kind_retention(database_url: str) -> None:
    from datetime import date

    from cityops.api.projector import store as store_state
    from cityops.common.kinds import Kind

    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    try:
        today = date(2026, 11, 26)
        created = await store_state.ensure_partitions(
            conn, first_day=today - timedelta(days=40), days=44
        )
        assert created == 44
        assert await store_state.ensure_partitions(conn, first_day=today, days=4) == 0
        rows = [
            (device, kind, seq, datetime(2026, 11, 26, tzinfo=UTC) - timedelta(days=age))
            for seq, (device, kind, age) in enumerate(
                [
                    ("pk-old", "parking", 35),  # past parking's 30 days
                    ("pk-new", "parking", 5),
                    ("wb-old", "wastebin", 35),  # within wastebin's 90 days
                    ("mh-ancient", "manhole", 400),  # default partition, past 365 days
                ]
            )
        ]
        await conn.executemany(
            "INSERT INTO readings (device_id, kind, seq, ts, received_at, reading)"
            " VALUES ($1, $2, $3, $4, $4, '{}')",
            rows,
        )
        dropped, deleted = await store_state.apply_retention(
            conn,
            today=today,
            retention_days={
                Kind.PARKING: 30,
                Kind.WASTEBIN: 90,
                Kind.MANHOLE: 365,
                Kind.STREETLIGHT: 38,
            },
        )
        # Days older than the longest retention are dropped whole; none of ours is that old
        # except the manhole row, which sits in the default partition and is deleted by kind.
        assert dropped == 0
        assert deleted == 2
        left = {r["device_id"] for r in await conn.fetch("SELECT device_id FROM readings")}
        assert left == {"pk-new", "wb-old"}
        dropped, _ = await store_state.apply_retention(
            conn,
            today=today,
            retention_days=dict.fromkeys(Kind, 10),
        )
        assert dropped == 30  # the days from today - 40 to today - 11
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname = 'readings'"
        )
        assert partitions == 44 - 30 + 1  # plus readings_default
    finally:
        await conn.close()


async def test_offsets_committed_after_the_writes_and_on_stop(
    database_url: str, kafka: StackKafka, kafka_topics: Any
) -> None:
    """Commits are coalesced over an interval; stopping commits what was written."""
    topics = await kafka_topics(
        "city.telemetry.v1", "city.status.v1", "city.deadletter.v1", partitions=3
    )
    telemetry_topic = topics["city.telemetry.v1"]
    devices = [f"sl-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    for device_id in devices:
        await _add_device(database_url, device_id, "wastebin")
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    await produce(
        kafka.admin,
        telemetry_topic,
        [
            (d, telemetry(d, "wastebin", seq, t0 + timedelta(minutes=seq), fill_pct=float(seq)))
            for seq in (1, 2, 3)
            for d in devices
        ],
    )
    group = f"api-projector-{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    producer = kafka_producer(kafka.service("api"))
    await producer.start()
    metrics = create_metrics(CollectorRegistry())
    projector = Projector(
        set_aside=SetAside(
            producer=producer,
            topic=topics["city.deadletter.v1"],
            consumer=group,
            counter=metrics.projector_set_aside,
        ),
        pool=pool,
        access=kafka.service("api"),
        topics=[telemetry_topic, topics["city.status.v1"]],
        telemetry_topic=telemetry_topic,
        group_id=group,
        metrics=metrics,
        batch_max=7,  # many small batches, far fewer commits
        commit_interval_s=0.5,
        fetch_timeout_ms=100,
        partitions_ahead_days=1,
        retention_days=dict.fromkeys(Kind, 3650),
        maintenance_interval_s=3600,
        client_id=f"test-{group}",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        await wait_for(lambda: projector.records >= 60, timeout=30, message="60 projected")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await producer.stop()
    try:
        seqs = await pool.fetch("SELECT device_id, seq FROM device_state")
        assert {r["device_id"]: r["seq"] for r in seqs} == dict.fromkeys(devices, 3)
    finally:
        await pool.close()
    assert projector.batches >= 9
    assert 1 <= projector.commits < projector.batches

    consumer = kafka_consumer(kafka.admin, group_id=group)
    await consumer.start()
    try:
        partitions = [TopicPartition(telemetry_topic, p) for p in range(3)]
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()
    assert sum(ends.values()) == 60
    assert committed == {tp: (end or None) for tp, end in ends.items()}
