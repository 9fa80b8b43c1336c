"""A device provisioned while the rules service runs gets its registry profile at once."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cityops.common.kinds import Kind
from cityops.common.registry import Device
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import (
    Feed,
    make_rules_env,
    reading,
    register,
    running_worker,
    wait_ticket,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_first_ticket_of_a_just_provisioned_device_carries_its_district(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    device_id = f"wb-new-{uuid.uuid4().hex[:6]}"
    # the periodic refresh is far away: only the look-up of unknown devices can find it
    async with running_worker(env.settings(rules_registry_refresh_s=3600.0)), Feed(env) as feed:
        await register(
            database_url,
            Device(device_id=device_id, kind=Kind.WASTEBIN, district="harbour"),
        )
        await feed.readings([reading(device_id, Kind.WASTEBIN, 1, fill_pct=95.0)])
        ticket = await wait_ticket(database_url, device_id=device_id, rule="bin_full")
    assert ticket["district"] == "harbour"
