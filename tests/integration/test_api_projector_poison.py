"""The poison corpus produced straight into Kafka: the projector sets each record aside.

On 0020c77 the year-1 record made every write of its batch fail, the projector gave up after five
retries and its task ended while /readyz stayed green: no reading after it was ever written.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from cityops.common.setaside import REASONS
from tests.helpers import wait_for
from tests.integration.api_support import ApiCase, produce, run_api, telemetry
from tests.integration.poison_support import corpus, dead_letters, ready_and_counted

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_projector_sets_the_poison_corpus_aside_and_keeps_projecting(
    api_case: ApiCase,
) -> None:
    settings = api_case.settings()
    topics = api_case.topics
    prefix = f"wb-{uuid.uuid4().hex[:6]}"
    poison = corpus(f"{prefix}-p")
    valid = [f"{prefix}-ok{n}" for n in range(6)]
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

    def readings(seq: int) -> list[tuple[str, bytes]]:
        return [
            (d, telemetry(d, "wastebin", seq, t0 + timedelta(seconds=seq), fill_pct=10.0 * seq))
            for d in valid
        ]

    async with run_api(settings) as api, api.client(key=None) as http:
        await produce(api_case.kafka.admin, topics["city.telemetry.v1"], readings(1))
        await produce(
            api_case.kafka.admin,
            topics["city.telemetry.v1"],
            [(p.device_id, p.value) for p in poison],  # type: ignore[misc]  # None: a tombstone
        )
        await produce(api_case.kafka.admin, topics["city.telemetry.v1"], readings(2))

        async def all_at_seq_2() -> bool:
            conn = await asyncpg.connect(api_case.database_url)
            try:
                rows = await conn.fetch(
                    "SELECT device_id, seq FROM device_state WHERE device_id = ANY($1::text[])",
                    valid,
                )
                count = await conn.fetchval(
                    "SELECT count(*) FROM readings WHERE device_id = ANY($1::text[])", valid
                )
            finally:
                await conn.close()
            return {r["device_id"]: r["seq"] for r in rows} == dict.fromkeys(valid, 2) and (
                count == 2 * len(valid)
            )

        await wait_for(all_at_seq_2, timeout=30, message="every valid reading projected")

        letters = await dead_letters(
            api_case.kafka.admin, topics["city.deadletter.v1"], expected=len(poison)
        )
        assert len(letters) == len(poison), letters
        where = {(h["source_partition"], h["source_offset"]) for h in letters}
        assert len(where) == len(poison)  # one dead letter each, none twice
        assert {h["consumer"] for h in letters} == {settings.api_projector_group}
        assert {h["source_topic"] for h in letters} == {topics["city.telemetry.v1"]}
        assert all(h["reason"] in REASONS and h["detail"] for h in letters)
        reasons = sorted(h["reason"] for h in letters)
        assert reasons == sorted(p.projector_reason for p in poison)
        out_of_range = [h for h in letters if "outside the contract's range" in h["detail"]]
        assert len(out_of_range) == 2, letters  # year 1 and year 9999
        # the NULs are found only when PostgreSQL refuses them: the batch was bisected
        refused = [h["detail"] for h in letters if h["reason"] == "unprocessable"]
        assert len(refused) == 2 and all("Unicode" in d or "UTF8" in d for d in refused), refused

        # Nothing of the poison reached the read model.
        conn = await asyncpg.connect(api_case.database_url)
        try:
            leaked = await conn.fetchval(
                "SELECT count(*) FROM readings WHERE device_id LIKE $1", f"{prefix}-p%"
            )
        finally:
            await conn.close()
        assert leaked == 0

        set_aside = await ready_and_counted(
            http, check="projector", counter="cityops_api_projector_set_aside_total"
        )
        assert set_aside == len(poison)
