"""SSE delivers changes; lists paginate and filter (bbox); readings bucket; district KPIs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tests.helpers import wait_for
from tests.integration.api_support import (
    ApiCase,
    produce,
    run_api,
    telemetry,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of each SSE event in a streaming response."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield fields.get("id", ""), fields.get("event", ""), orjson.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


async def _next_event(
    events: AsyncIterator[tuple[str, str, dict[str, Any]]],
) -> tuple[str, str, dict[str, Any]]:
    return await asyncio.wait_for(anext(events), 15)


async def test_stream_delivers_state_changes_filtered_and_resumes(
    api_case: ApiCase, database_url: str
) -> None:
    topics = api_case.topics
    settings = api_case.settings(
        api_projector_enabled=False,
    )
    bin_id, spot_id = f"wb-{uuid.uuid4().hex[:8]}", f"pk-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        "INSERT INTO devices (device_id, kind, district) VALUES ($1, 'wastebin', 'old-town'),"
        " ($2, 'parking', 'harbour')",
        bin_id,
        spot_id,
    )
    await conn.close()
    now = datetime.now(UTC)
    async with run_api(settings) as api, api.client() as http:
        async with http.stream(
            "GET", "/v1/stream", params={"district": "old-town"}, timeout=30
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _events(stream)
            await asyncio.wait_for(api.context.broadcaster.live.wait(), 15)
            await produce(
                api_case.kafka.admin,
                topics["city.telemetry.v1"],
                [
                    (spot_id, telemetry(spot_id, "parking", 1, now, occupied=True)),
                    (bin_id, telemetry(bin_id, "wastebin", 8, now, fill_pct=91.0)),
                    (bin_id, telemetry(bin_id, "wastebin", 7, now, fill_pct=80.0)),
                    (bin_id, telemetry(bin_id, "wastebin", 9, now, fill_pct=92.0)),
                ],
            )
            event_id, event_type, data = await _next_event(events)
            assert event_type == "state"
            assert (data["device_id"], data["seq"], data["district"]) == (bin_id, 8, "old-town")
            assert data["values"]["fill_pct"] == 91.0
            # seq 7 arrived late: not a state change; the parking spot is filtered out.
            _, _, data = await _next_event(events)
            assert data["seq"] == 9
            last_id = event_id

        # Reconnect with Last-Event-ID (seq 8's): resume from its millisecond, nothing skipped.
        async with http.stream(
            "GET",
            "/v1/stream",
            params={"district": "old-town", "type": "state"},
            headers={"Last-Event-ID": last_id},
            timeout=30,
        ) as stream:
            events = _events(stream)
            resumed = [(await _next_event(events))[2]["seq"]]
            while resumed[-1] != 9:
                resumed.append((await _next_event(events))[2]["seq"])
            assert resumed == [8, 9]  # seq 8 (its own millisecond) again, 7 is no change
        bad = await http.get("/v1/stream", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422
        assert api.context.metrics.stream_clients._value.get() == 0


async def test_lists_readings_and_district_summary(api_case: ApiCase, database_url: str) -> None:
    topics = api_case.topics
    settings = api_case.settings()
    conn = await asyncpg.connect(database_url)
    # 30 devices on a line of longitudes; kinds cycle.
    kinds = ["streetlight", "wastebin", "parking"]
    await conn.executemany(
        "INSERT INTO devices (device_id, kind, district, lat, lon) VALUES ($1, $2, $3, 50.0, $4)",
        [
            (f"dev-{i:03d}", kinds[i % 3], "centre" if i < 15 else "edge", 10.0 + i / 10)
            for i in range(30)
        ],
    )
    await conn.close()
    t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    records = []
    for i in range(15):
        device_id, kind = f"dev-{i:03d}", kinds[i % 3]
        by_kind: dict[str, dict[str, Any]] = {
            "streetlight": {"lamp_on": True, "fault": "lamp_failure" if i == 0 else "none"},
            "wastebin": {"fill_pct": 95.0 if i in {1, 4} else 20.0},
            "parking": {"occupied": i in {2, 5, 8}},
        }
        records.append((device_id, telemetry(device_id, kind, 1, t0, **by_kind[kind])))
    for minute in range(0, 120, 10):  # dev-001, a bin, fills over two hours
        records.append(  # noqa: PERF401 - one reading per step reads better as a loop
            (
                "dev-001",
                telemetry(
                    "dev-001",
                    "wastebin",
                    2 + minute,
                    t0 + timedelta(minutes=minute),
                    fill_pct=minute / 2,
                ),
            )
        )
    async with run_api(settings) as api, api.client() as http:
        await produce(api_case.kafka.admin, topics["city.telemetry.v1"], records)

        async def projected() -> bool:
            body = (await http.get("/v1/devices/dev-001")).json()
            return body["state"] is not None and body["state"]["seq"] == 112

        await wait_for(projected, timeout=20, message="projected")

        # Pagination: stable, complete, no duplicates.
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/v1/devices", params=params)).json()
            seen += [d["device_id"] for d in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"dev-{i:03d}" for i in range(30)]
        page = (
            await http.get("/v1/devices", params={"kind": "parking", "district": "centre"})
        ).json()
        assert [d["device_id"] for d in page["items"]] == [
            "dev-002",
            "dev-005",
            "dev-008",
            "dev-011",
            "dev-014",
        ]
        box = (await http.get("/v1/devices", params={"bbox": "10.45,49,10.75,51"})).json()
        assert [d["device_id"] for d in box["items"]] == ["dev-005", "dev-006", "dev-007"]
        never = (
            await http.get("/v1/devices", params={"status": "never_seen", "limit": 100})
        ).json()
        assert len(never["items"]) == 15
        for bad in ("1,2,3", "10,60,5,70", "a,b,c,d"):
            response = await http.get("/v1/devices", params={"bbox": bad})
            assert response.status_code == 422
            assert response.json()["errors"][0]["field"] == "query.bbox"
        assert (await http.get("/v1/devices", params={"cursor": "garbage!"})).status_code == 422

        # Buckets of one hour over the bin's fill level.
        response = await http.get(
            "/v1/devices/dev-001/readings",
            params={
                "from": t0.isoformat(),
                "to": (t0 + timedelta(hours=2)).isoformat(),
                "field": "fill_pct",
                "bucket": "1h",
            },
        )
        assert response.status_code == 200, response.text
        buckets = response.json()["buckets"]
        # first hour: seq 1 (95.0) and minutes 0..50; second hour: minutes 60..110 (30..55 %)
        assert [b["count"] for b in buckets] == [7, 6]
        assert buckets[0]["max"] == 95.0
        assert buckets[1]["min"] == 30.0
        assert buckets[1]["last"] == 55.0
        assert buckets[1]["avg"] == pytest.approx(42.5)
        wrong = await http.get("/v1/devices/dev-001/readings", params={"field": "occupied"})
        assert wrong.status_code == 422
        narrow = await http.get(
            "/v1/devices/dev-001/readings",
            params={
                "field": "fill_pct",
                "bucket": "1s",
                "from": (t0 - timedelta(days=30)).isoformat(),
            },
        )
        assert narrow.status_code == 422

        summary = (await http.get("/v1/districts/centre/summary")).json()
        assert summary["devices"] == 15
        assert (summary["lights_reporting"], summary["lights_working"]) == (5, 4)
        assert summary["lights_working_pct"] == 80.0
        assert (summary["bins_reporting"], summary["bins_full"]) == (
            5,
            1,
        )  # dev-004; dev-001 is at 55 % now
        assert summary["parking_occupancy_pct"] == 60.0
        assert (await http.get("/v1/districts/nowhere/summary")).status_code == 404
        districts = (await http.get("/v1/districts")).json()["items"]
        assert [(d["district"], d["devices"]) for d in districts] == [("centre", 15), ("edge", 15)]
