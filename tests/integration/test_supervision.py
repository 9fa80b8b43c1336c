"""A long-running task that ends anyway fails its service: it exits 1, so it is restarted.

Data and outages never end the projector or the rules loop (the poison and outage tests); a bug
still could. The failure is injected into the real batch step. On 0020c77 the projector task
ended with one log line, the HTTP API went on serving with /readyz 200 and the process never
exited, so no supervisor restarted it.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from cityops.api import main as api_main
from cityops.api.projector.consumer import Projector
from cityops.rules.config import load_rules
from cityops.rules.consumer import RulesWorker
from cityops.rules.main import run as run_rules
from tests.integration.api_support import ApiCase, produce, telemetry
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import Feed, make_rules_env, reading

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_a_projector_that_ends_makes_the_api_exit_non_zero(
    api_case: ApiCase,
    kafka: StackKafka,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(self: Projector, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the projector")

    monkeypatch.setattr(Projector, "_project", broken)
    device_id = f"wb-{uuid.uuid4().hex[:8]}"
    await produce(
        kafka.admin,
        api_case.topics["city.telemetry.v1"],
        [(device_id, telemetry(device_id, "wastebin", 1, datetime.now(UTC), fill_pct=5.0))],
    )
    try:
        code = await asyncio.wait_for(api_main.serve(api_case.settings()), 60)
    finally:
        gc.unfreeze()  # serve() froze the test process's heap
    assert code == 1
    ended = [r for r in caplog.records if "long-running task ended" in r.getMessage()]
    assert [getattr(r, "task", None) for r in ended] == ["projector"]


async def test_a_rules_loop_that_ends_makes_rules_exit_non_zero(
    kafka_topics: Any,
    kafka: StackKafka,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: RulesWorker, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in rules")

    monkeypatch.setattr(RulesWorker, "_batch", broken)
    env = await make_rules_env(kafka_topics, kafka, database_url)
    async with Feed(env) as feed:
        await feed.readings([reading("wb-supervised", "wastebin", 1, fill_pct=5.0)])
    code = await asyncio.wait_for(run_rules(env.settings(), load_rules(), stop=asyncio.Event()), 60)
    assert code == 1
