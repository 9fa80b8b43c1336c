"""kill -9 in the middle of a stream: after a restart no ticket is lost or duplicated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cityops.common.kinds import Kind
from cityops.common.registry import Device
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import (
    Feed,
    RulesEnv,
    make_rules_env,
    now,
    reading,
    register,
    ticket_events,
    tickets,
    wait_ticket,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
CITYOPS = Path(sys.executable).with_name("cityops")


def start(env: RulesEnv, log_path: Path) -> subprocess.Popen[bytes]:
    """`cityops rules` as a subprocess (so it can be killed for real)."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [str(CITYOPS), "rules"],
            env={**os.environ, **env.env(rules_outbox_sweep_s="1", rules_batch_max="50")},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    kafka_topics: Any, kafka: StackKafka, database_url: str, tmp_path: Path
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    suffix = uuid.uuid4().hex[:6]
    bins = [f"wb-{i}-{suffix}" for i in range(60)]
    silent = f"sl-silent-{suffix}"
    await register(
        database_url,
        *(Device(device_id=d, kind=Kind.WASTEBIN, reporting_interval_s=3600) for d in bins),
        Device(device_id=silent, kind=Kind.STREETLIGHT, reporting_interval_s=4),
    )
    log_path = tmp_path / "rules.log"
    process = start(env, log_path)
    try:
        async with Feed(env) as feed:
            heard = now()  # just before ingest's received_at
            await feed.readings([reading(silent, Kind.STREETLIGHT, 1, lamp_on=True)])
            # every bin overflows 20 times, a round every 0.15 s; the kill lands mid-stream

            async def stream() -> None:
                for seq in range(1, 21):
                    await feed.readings(
                        reading(d, Kind.WASTEBIN, seq, fill_pct=90.0 + seq / 10) for d in bins
                    )
                    await asyncio.sleep(0.15)  # the fleet's pace

            producing = asyncio.create_task(stream())
            await wait_for(
                lambda: count(database_url, "SELECT count(*) FROM tickets"),
                timeout=30,
                message="some tickets before the kill",
            )
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=10) == -signal.SIGKILL
            assert not producing.done(), "the stream ended before the kill"
            process = start(env, log_path)
            await producing

            async def all_counted() -> bool:
                total = await count(
                    database_url,
                    "SELECT coalesce(sum(occurrences), 0) FROM tickets WHERE rule = 'bin_full'",
                )
                return total >= 20 * len(bins)

            await wait_for(all_counted, timeout=60, message="every reading counted")
            # the silent light's offline timer survived the crash
            offline = await wait_ticket(
                database_url, device_id=silent, rule="device_offline", within_s=30
            )
            # 3 x 4 s after it was last heard; restored deadlines may add half an interval,
            # and the restarted replica first waits out the killed member's session
            assert 12.0 <= (offline["opened_at"] - heard).total_seconds() <= 22.0
        rows = await tickets(database_url, rule="bin_full")
        assert sorted(r["device_id"] for r in rows) == sorted(bins)  # one each, none lost
        assert {r["occurrences"] for r in rows} == {20}  # none counted twice
        assert {r["status"] for r in rows} == {"open"}
        opened = await count(
            database_url, "SELECT count(*) FROM ticket_transitions WHERE action = 'opened'"
        )
        assert opened == len(bins) + 1
        # every transition reached city.tickets.v1 (at least once; the outbox drained)
        events = await ticket_events(env, expect=opened)
        assert len({e["transition_id"] for e in events}) == opened
        await wait_for(
            lambda: count(database_url, "SELECT count(*) = 0 FROM rule_outbox"),
            timeout=10,
            message="outbox drained",
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, log_path.read_text()[-3000:]
    summary = [line for line in log_path.read_text().splitlines() if "rules stopped" in line]
    assert summary, "no shutdown summary line"
