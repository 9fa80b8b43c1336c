"""Rules de-duplicates on the seqs it saw, not on their order (issue 12, row 3).

A publisher that resends unacknowledged readings after a reconnect (paho does) puts seq 530 in
Kafka before 482-529. On 0020c77 rules took every seq at or below the last one for a duplicate:
the late readings were dropped and the bin_full tickets they call for never opened.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import Feed, make_rules_env, reading, running_worker, tickets

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
FULL = range(490, 496)  # the readings that call for bin_full: six occurrences of one ticket


def at(device_id: str, seq: int, fill_pct: float | None = None) -> dict[str, Any]:
    """The reading of `seq`, measured at T0 + seq seconds."""
    fill = fill_pct if fill_pct is not None else (95.0 if seq in FULL else 50.0)
    return {
        **reading(device_id, Kind.WASTEBIN, seq, fill_pct=fill),
        "ts": (T0 + timedelta(seconds=seq)).isoformat(),
    }


async def occurrences(database_url: str, devices: list[str], expected: int) -> bool:
    """Every device has exactly one bin_full ticket, open, with `expected` occurrences."""
    for device_id in devices:
        rows = await tickets(database_url, device_id=device_id)
        if len(rows) != 1:
            return False
        assert rows[0]["rule"] == "bin_full" and rows[0]["status"] == "open", rows
        assert rows[0]["occurrences"] <= expected, rows  # never more: that is a double count
        if rows[0]["occurrences"] != expected:
            return False
    return True


async def test_late_readings_open_their_tickets_and_replays_add_nothing(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    devices = [f"wb-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    resent = [530, *range(482, 530), 531]
    stream = [at(d, seq) for d in devices for seq in [*range(470, 482), *resent]]

    async with Feed(env) as feed:
        async with running_worker(env.settings()):
            await feed.readings(stream)
            await wait_for(
                lambda: occurrences(database_url, devices, len(FULL)),
                timeout=30,
                message="a bin_full ticket with six occurrences per device",
            )
            # the publisher resends the same window again: all of it was seen
            await feed.readings(at(d, seq) for d in devices for seq in resent)
            await feed.readings(at(d, 532, fill_pct=95.0) for d in devices)  # after the replay
            await wait_for(
                lambda: occurrences(database_url, devices, len(FULL) + 1),
                timeout=30,
                message="only the new reading counted",
            )

        # A replica with a fresh group re-reads the whole topic: the window is in rule_state.
        async with running_worker(env.settings(rules_group=f"{env.group}-replay")):
            await feed.readings(at(d, 533, fill_pct=95.0) for d in devices)
            await wait_for(
                lambda: occurrences(database_url, devices, len(FULL) + 2),
                timeout=30,
                message="the replayed topic decided nothing again",
            )
