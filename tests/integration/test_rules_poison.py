"""The poison corpus produced straight into Kafka: rules sets each record aside and goes on.

On 0020c77 the year-1 reading crashed the rules loop (a ticket's details could not render its
timestamp) and a NUL in a reading made every retry of its batch fail in PostgreSQL forever.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from cityops.common.kinds import Kind
from cityops.common.setaside import REASONS, UNPROCESSABLE
from tests.helpers import wait_for
from tests.integration.api_support import produce
from tests.integration.ingest_support import free_port
from tests.integration.kafka_support import StackKafka
from tests.integration.poison_support import corpus, dead_letters, ready_and_counted
from tests.integration.rules_support import (
    Feed,
    make_rules_env,
    reading,
    running_worker,
    tickets,
    wait_ticket,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_rules_sets_the_poison_corpus_aside_and_keeps_deciding(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    port = free_port()
    settings = env.settings(metrics_port=port)
    prefix = f"wb-{uuid.uuid4().hex[:6]}"
    poison = corpus(f"{prefix}-p")
    valid = [f"{prefix}-ok{n}" for n in range(4)]
    async with running_worker(settings), Feed(env) as feed:
        await feed.readings(reading(d, Kind.WASTEBIN, 1, fill_pct=10.0) for d in valid)
        await produce(
            kafka.admin,
            env.topics["city.telemetry.v1"],
            [(p.device_id, p.value) for p in poison],  # type: ignore[misc]  # None: a tombstone
        )
        await feed.readings(reading(d, Kind.WASTEBIN, 2, fill_pct=95.0) for d in valid)
        for device_id in valid:
            await wait_ticket(database_url, device_id=device_id, rule="bin_full", within_s=30)

        letters = await dead_letters(
            kafka.admin, env.topics["city.deadletter.v1"], expected=len(poison)
        )
        assert len(letters) == len(poison), letters
        assert len({(h["source_partition"], h["source_offset"]) for h in letters}) == len(poison)
        assert {h["consumer"] for h in letters} == {settings.rules_group}
        assert all(h["reason"] in REASONS and h["detail"] for h in letters)
        # the NULs are found only when PostgreSQL refuses the ticket or the state they make
        assert sum(h["reason"] == UNPROCESSABLE for h in letters) == 2, letters

        for p in poison:
            assert await tickets(database_url, device_id=p.device_id) == []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            set_aside = await ready_and_counted(
                http, check="consumer", counter="cityops_rules_set_aside_total"
            )
        assert set_aside == len(poison)

        # and it still decides: the bins are emptied, the tickets auto-resolve
        await feed.readings(reading(d, Kind.WASTEBIN, 3, fill_pct=5.0) for d in valid)

        async def resolved() -> bool:
            rows = [t for d in valid for t in await tickets(database_url, device_id=d)]
            return len(rows) == len(valid) and all(t["status"] == "resolved" for t in rows)

        await wait_for(resolved, timeout=20, message="bin_full tickets auto-resolved")
