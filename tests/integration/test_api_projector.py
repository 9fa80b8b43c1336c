"""The projector against real Kafka and PostgreSQL: readings become state, never backwards."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from cityops.common.events import StatusEvent, encode_status
from tests.helpers import wait_for
from tests.integration.api_support import api_settings, produce, run_api, telemetry

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
    database_url: str, kafka_bootstrap: str, kafka_topics: Any
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
    settings = api_settings(
        database_url=database_url, kafka_bootstrap=kafka_bootstrap, topics=topics
    )
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    async with run_api(settings) as api, api.client() as http:
        await produce(
            kafka_bootstrap,
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
            kafka_bootstrap,
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
            kafka_bootstrap,
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
            kafka_bootstrap,
            topics["city.status.v1"],
            [(device_id, encode_status(offline)), (device_id, encode_status(stale))],
        )

        async def offline_now() -> bool:
            response = await http.get(f"/v1/devices/{device_id}")
            return response.json()["connectivity"]["online"] is False

        await wait_for(offline_now, timeout=20, message="offline visible")
        await produce(
            kafka_bootstrap,
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
