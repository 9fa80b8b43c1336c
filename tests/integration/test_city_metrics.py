"""City gauges and the `ops` read model against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from cityops.common.city_metrics import CityMetrics, run_city_metrics
from tests.helpers import wait_for
from tests.integration.grafana_reader import reader_connection

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)


async def seed_city(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Two districts, every kind, a few states, connectivity and tickets."""
    devices = [
        # device_id, kind, district, lat, lon, interval
        ("sl-n-1", "streetlight", "north", 52.1, 4.1, 300),
        ("sl-n-2", "streetlight", "north", 52.2, 4.2, 300),
        ("sl-n-3", "streetlight", "north", 52.3, 4.3, 300),
        ("sl-s-1", "streetlight", "south", 52.0, 4.0, 300),
        ("wb-s-1", "wastebin", "south", 52.0, 4.5, 600),
        ("wb-s-2", "wastebin", "south", 52.0, 4.6, 600),
        ("pk-s-1", "parking", "south", 52.0, 4.7, 60),
        ("pk-s-2", "parking", "south", 52.0, 4.8, 60),
        ("pk-s-3", "parking", "south", None, None, 60),
        ("mh-n-1", "manhole", "north", 52.4, 4.4, 300),
    ]
    await conn.executemany(
        "INSERT INTO devices (device_id, kind, district, lat, lon, reporting_interval_s)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        devices,
    )
    recent = NOW - timedelta(seconds=30)
    old = NOW - timedelta(hours=2)
    states = [
        ("sl-n-1", "streetlight", recent, {"lamp_on": True, "fault": "none"}),
        ("sl-n-2", "streetlight", recent, {"lamp_on": False, "fault": "lamp_failure"}),
        ("sl-n-3", "streetlight", old, {"lamp_on": True}),  # silent for 2 h: offline
        ("wb-s-1", "wastebin", recent, {"fill_pct": 95.0}),
        ("wb-s-2", "wastebin", recent, {"fill_pct": 40.0}),
        ("pk-s-1", "parking", recent, {"occupied": True}),
        ("pk-s-2", "parking", recent, {"occupied": False}),
        ("mh-n-1", "manhole", recent, {"cover_open": True}),
    ]
    await conn.executemany(
        "INSERT INTO device_state (device_id, kind, seq, ts, received_at, reading)"
        " VALUES ($1, $2, 1, $3, $3, $4::jsonb)",
        [(d, k, at, json.dumps(r)) for d, k, at, r in states],
    )
    # the manhole said goodbye (last will): offline although heard recently
    await conn.execute(
        "INSERT INTO device_connectivity (device_id, online, last_seen_at, changed_at, status_at)"
        " VALUES ('mh-n-1', false, $1, $1, $1)",
        recent,
    )
    tickets = [
        # device, kind, district, rule, priority, department, status, opened, due
        (
            "mh-n-1",
            "manhole",
            "north",
            "cover_open",
            "P1",
            "municipal_works",
            "open",
            NOW - timedelta(hours=2),
            NOW - timedelta(hours=1),
        ),
        (
            "sl-s-1",
            "streetlight",
            "south",
            "lamp_out",
            "P3",
            "street_lighting",
            "acknowledged",
            NOW - timedelta(hours=1),
            NOW + timedelta(hours=47),
        ),
        (
            "wb-s-1",
            "wastebin",
            "south",
            "bin_full",
            "P3",
            "sanitation",
            "resolved",
            NOW - timedelta(hours=3),
            NOW + timedelta(hours=1),
        ),
    ]
    await conn.executemany(
        "INSERT INTO tickets (device_id, kind, district, rule, priority, department, status,"
        " opened_at, due_at, last_seen_at, details, resolved_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, '{}'::jsonb,"
        " CASE WHEN $7 = 'resolved' THEN $8::timestamptz + interval '1 hour' END)",
        tickets,
    )


def _value(metrics: CityMetrics, metric: str, **labels: str) -> float:
    snapshot = metrics.snapshot
    assert snapshot is not None
    matches = [
        row.value
        for row in snapshot.rows
        if row.metric == metric and all(getattr(row, k) == v for k, v in labels.items())
    ]
    assert matches, f"no {metric} row with {labels}"
    return sum(matches)


async def test_refresh_computes_the_city_from_the_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await seed_city(conn)
        metrics = CityMetrics()
        await metrics.refresh(conn)
    finally:
        await conn.close()

    assert (
        _value(metrics, "devices", district="north", kind="streetlight", connectivity="online") == 2
    )
    assert (
        _value(metrics, "devices", district="north", kind="streetlight", connectivity="offline")
        == 1
    )
    assert _value(metrics, "devices", district="north", kind="manhole", connectivity="offline") == 1
    assert (
        _value(metrics, "devices", district="south", kind="streetlight", connectivity="never_seen")
        == 1
    )
    # sl-n-2 reports a fault; sl-s-1 holds a lamp_out ticket although it never reported
    assert _value(metrics, "lamps_out", district="north") == 1
    assert _value(metrics, "lamps_out", district="south") == 1
    assert _value(metrics, "bins_full", district="south") == 1
    assert _value(metrics, "parking_occupied", district="south") == 1
    assert _value(metrics, "parking_reporting", district="south") == 2
    assert _value(metrics, "tickets_open", district="north", priority="P1") == 1
    assert _value(metrics, "tickets_overdue", district="north", priority="P1") == 1
    assert _value(metrics, "tickets_open", district="south", priority="P3") == 1
    # the resolved bin ticket keeps its series at zero: "no open ticket" is 0, not a gap
    assert _value(metrics, "tickets_open", district="south", department="sanitation") == 0
    assert _value(metrics, "tickets_overdue", district="south") == 0
    # a kind without any ticket still has a zero per priority (no department label)
    assert _value(metrics, "tickets_open", district="south", kind="parking", priority="P4") == 0
    assert _value(metrics, "tickets_open", district="south", kind="parking", department="") == 0


async def test_background_refresh_serves_gauges_and_stops(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await seed_city(conn)
        registry = CollectorRegistry()
        connect = functools.partial(asyncpg.connect, database_url)
        async with run_city_metrics(connect, registry=registry, interval_s=1.0) as metrics:
            await wait_for(metrics.fresh, timeout=10, message="first refresh")
            value = registry.get_sample_value("cityops_city_bins_full", {"district": "south"})
            assert value == 1
            async with pool.acquire() as conn:
                await conn.execute(
                    "UPDATE device_state SET reading = '{\"fill_pct\": 91}'"
                    " WHERE device_id = 'wb-s-2'"
                )
            await wait_for(
                lambda: (
                    registry.get_sample_value("cityops_city_bins_full", {"district": "south"}) == 2
                ),
                timeout=10,
                message="the next refresh sees the second full bin",
            )
        assert registry.get_sample_value("cityops_city_bins_full", {"district": "south"}) is None
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)


async def test_reader_role_reads_ops_views_and_nothing_else(
    stack_env: Mapping[str, str], database_url: str
) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        await seed_city(owner)
    finally:
        await owner.close()
    async with reader_connection(stack_env, database_url) as reader:
        rows = await reader.fetch("SELECT device_id, state_code, state FROM ops.device_map")
        by_id = {row["device_id"]: (row["state_code"], row["state"]) for row in rows}
        assert by_id["mh-n-1"] == (4, "urgent ticket")
        assert by_id["sl-n-3"] == (3, "offline")
        assert by_id["sl-s-1"] == (2, "open ticket")
        assert by_id["sl-n-1"] == (0, "ok")
        assert "pk-s-3" not in by_id  # no position, no point on the map
        sla = {row["rule"]: row["sla"] for row in await reader.fetch("SELECT * FROM ops.tickets")}
        assert sla == {"cover_open": "missed", "lamp_out": "pending", "bin_full": "met"}
        for secret_table in ("device_credentials", "api_keys", "devices", "tickets"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetch(f"SELECT * FROM public.{secret_table} LIMIT 1")
        with pytest.raises(
            (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
        ):
            await reader.execute("DELETE FROM ops.tickets")
