"""The projector outlives a group it cannot join yet: it retries with a new consumer each time.

On 0020c77 a failed `consumer.start()` was retried on the same consumer, which aiokafka refuses
(`AssertionError: Did you call start twice?`): the projector task ended and the read model
stopped for good. Found while measuring the services' logs during an outage, where the group
could not be joined (here: a member holding the group with another assignment protocol).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from cityops.common.kafka import kafka_consumer
from tests.helpers import wait_for
from tests.integration.api_support import ApiCase, produce, run_api, telemetry
from tests.integration.kafka_support import StackKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_projector_retries_a_refused_group_join_and_then_projects(
    api_case: ApiCase, kafka: StackKafka, caplog: pytest.LogCaptureFixture
) -> None:
    group = f"api-projector-held-{uuid.uuid4().hex[:8]}"
    settings = api_case.settings(api_projector_group=group)
    holder = kafka_consumer(
        kafka.admin,
        api_case.topics["city.telemetry.v1"],
        group_id=group,
        partition_assignment_strategy=(RangePartitionAssignor,),
    )
    await holder.start()
    try:
        await wait_for(holder.assignment, timeout=20, message="the holder joined")
        async with run_api(settings) as api, api.client(key=None) as http:

            def refused_twice() -> bool:
                return (
                    sum("InconsistentGroupProtocol" in r.getMessage() for r in caplog.records) >= 2
                )

            await wait_for(refused_twice, timeout=20, message="two joins refused")
            body = (await http.get("/readyz")).json()
            assert body["checks"]["projector"] is False and body["checks"]["tasks"] is True
            await holder.stop()
            device_id = f"wb-{uuid.uuid4().hex[:8]}"
            await produce(
                kafka.admin,
                api_case.topics["city.telemetry.v1"],
                [(device_id, telemetry(device_id, "wastebin", 1, datetime.now(UTC), fill_pct=5.0))],
            )

            async def projected() -> bool:
                body = (await http.get("/readyz")).json()
                state = await api.context.pool.fetchval(
                    "SELECT seq FROM device_state WHERE device_id = $1", device_id
                )
                return state == 1 and body["ready"] is True

            await wait_for(projected, timeout=30, message="the projector joined and projected")
    finally:
        await holder.stop()
