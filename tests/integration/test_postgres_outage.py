"""PostgreSQL down for 30 s mid-stream: the projector and rules catch up by themselves.

The services run against a PostgreSQL of the test's own (the shared one is never stopped),
which is shut down immediately (no checkpoint, like a crash) while readings keep arriving in
Kafka, and started again 30 s later. Nothing is restarted by hand. On 0020c77 the projector
gave up after five retries (~9 s), its task ended and /readyz stayed green: most readings never
reached `readings` and no device's state moved until the API was restarted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.api_support import BASE_TOPICS, api_settings, run_api
from tests.integration.ingest_support import free_port
from tests.integration.kafka_support import StackKafka
from tests.integration.pg_instance import own_postgres
from tests.integration.rules_support import Feed, RulesEnv, reading, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

DEVICES = 12
RATE_PER_DEVICE_S = 2.0  # readings per second per device
BEFORE_S, DOWN_S, AFTER_S = 6.0, 30.0, 4.0


def fill_of(seq: int) -> float:
    """A bin that fills up and is emptied every 25 readings: 0, 4, ... 96 percent."""
    return float((seq % 25) * 4)


@dataclass
class Expected:
    """bin_full tickets the readings of one device call for (A6: raise >= 90, clear < 30)."""

    tickets: list[int] = field(default_factory=list)  # occurrences of each, in order
    open_last: bool = False

    @classmethod
    def of(cls, seqs: Sequence[int]) -> Expected:
        expected = cls()
        for seq in seqs:
            fill = fill_of(seq)
            if fill >= 90:
                if not expected.open_last:
                    expected.tickets.append(0)
                    expected.open_last = True
                expected.tickets[-1] += 1
            elif fill < 30:
                expected.open_last = False
        return expected


async def stream(feed: Feed, devices: list[str], *, seconds: float, first_seq: int) -> int:
    """Readings for every device at RATE_PER_DEVICE_S for `seconds`; returns the next seq."""
    seq = first_seq
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await feed.readings(reading(d, Kind.WASTEBIN, seq, fill_pct=fill_of(seq)) for d in devices)
        seq += 1
        await asyncio.sleep(1 / RATE_PER_DEVICE_S)
    return seq


async def test_projector_and_rules_catch_up_after_postgres_is_down_for_30_s(
    kafka_topics: Any, kafka: StackKafka
) -> None:
    topics = await kafka_topics(*BASE_TOPICS, partitions=3)
    devices = [f"wb-{uuid.uuid4().hex[:8]}" for _ in range(DEVICES)]
    async with own_postgres() as pg:
        rules_env = RulesEnv(kafka, pg.url, topics, f"rules-outage-{uuid.uuid4().hex[:8]}")
        rules_port = free_port()
        api = api_settings(database_url=pg.url, kafka=kafka, topics=topics)
        async with (
            run_api(api) as running,
            running.client(key=None) as http,
            running_worker(rules_env.settings(metrics_port=rules_port)),
            Feed(rules_env) as feed,
        ):
            seq = await stream(feed, devices, seconds=BEFORE_S, first_seq=0)
            await asyncio.to_thread(pg.stop)
            try:
                seq = await stream(feed, devices, seconds=DOWN_S, first_seq=seq)
                # while it is down, the API says it is not ready
                assert (await http.get("/readyz")).status_code == 503
            finally:
                await asyncio.to_thread(pg.start)
            seq = await stream(feed, devices, seconds=AFTER_S, first_seq=seq)
            produced = seq
            expected = Expected.of(range(produced))
            assert len(expected.tickets) >= 2  # the outage spans raises and clears

            async def caught_up() -> bool:
                conn = await asyncpg.connect(pg.url)
                try:
                    readings = await conn.fetchval(
                        "SELECT count(*) FROM readings WHERE device_id = ANY($1::text[])", devices
                    )
                    states = await conn.fetch(
                        "SELECT device_id, seq FROM device_state WHERE device_id = ANY($1)",
                        devices,
                    )
                    tickets = await conn.fetch(
                        "SELECT device_id, status, occurrences FROM tickets "
                        "WHERE rule = 'bin_full' ORDER BY id"
                    )
                finally:
                    await conn.close()
                if readings != produced * DEVICES:
                    return False
                if {r["device_id"]: r["seq"] for r in states} != dict.fromkeys(
                    devices, produced - 1
                ):
                    return False
                for device_id in devices:
                    rows = [t for t in tickets if t["device_id"] == device_id]
                    if [t["occurrences"] for t in rows] != expected.tickets:
                        return False
                    statuses = ["resolved"] * (len(rows) - 1) + [
                        "open" if expected.open_last else "resolved"
                    ]
                    assert [t["status"] for t in rows] == statuses, rows
                return True

            await wait_for(caught_up, timeout=60, interval=0.5, message="caught up by itself")
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rules_port}") as rules:
                ready = await rules.get("/readyz")
            assert ready.status_code == 200, ready.text
