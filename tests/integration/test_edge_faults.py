"""No acknowledged reading lost at the edge: broker and ingest faults, attackers, 50 devices.

Each case runs ~12 s of traffic (300 readings/s from 50 devices, QoS 1) against a broker of its
own (tests/integration/edge_faults.py), strikes once, and checks that every (device, seq) the
broker PUBACKed is in the telemetry topic. `make test` runs these in a stage of their own
(`pytest -m edge_faults`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import pytest
import pytest_asyncio
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.conftest import MakeTopics, MqttSettings
from tests.integration.edge_faults import (
    RATE_PER_S,
    Attacker,
    EdgeCase,
    Outcome,
    connack_of,
    edge_case,
)

pytestmark = [
    pytest.mark.edge_faults,
    pytest.mark.kafka,
    pytest.mark.mqtt,
    pytest.mark.postgres,
]

BEFORE = 1_200  # readings published before the fault (~4 s)
TOTAL = 3_600  # readings in the whole case (~12 s)
KILL_LOSS_BOUND = RATE_PER_S // 10


@pytest_asyncio.fixture
async def edge(
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt_settings: MqttSettings,
) -> AsyncIterator[EdgeCase]:
    async with edge_case(
        stack_env=stack_env,
        kafka_topics=kafka_topics,
        database_url=database_url,
        mqtt=mqtt_settings,
        spare_devices=3,
    ) as made:
        yield made


async def strike(edge: EdgeCase, what: str, fault: Callable[[], Awaitable[None]]) -> Outcome:
    """~4 s of traffic, the fault, traffic up to TOTAL readings; what reached Kafka."""
    await edge.start_fleet()
    await edge.publish_until(BEFORE)
    await fault()
    await edge.publish_until(TOTAL)
    outcome = await edge.outcome()
    print(f"{what}: {outcome}")
    assert outcome.acked >= TOTAL // 2, outcome
    return outcome


async def test_broker_restarted_cleanly_loses_no_acked_reading(edge: EdgeCase) -> None:
    async def restart() -> None:
        edge.broker.stop()
        edge.broker.start()

    outcome = await strike(edge, "broker SIGTERM + start", restart)
    assert not outcome.missing, outcome


async def test_broker_killed_loses_at_most_what_was_in_flight(edge: EdgeCase) -> None:
    async def kill_and_start() -> None:
        edge.broker.kill()
        edge.broker.start()

    outcome = await strike(edge, "broker kill -9 + start", kill_and_start)
    # Mosquitto writes nothing to disk before PUBACK: a kill -9 loses what it had acknowledged
    # to a device and not yet handed to ingest. Ingest keeps up, so that is what is in flight
    # at that instant; measured 0 in every run at 300 readings/s (mqtt-broker.md). The bound
    # is 0.1 s of readings.
    assert len(outcome.missing) <= KILL_LOSS_BOUND, outcome


async def test_ingest_down_while_broker_restarts_loses_no_acked_reading(edge: EdgeCase) -> None:
    async def restart_without_ingest() -> None:
        edge.stop_ingest()
        edge.broker.stop()
        edge.broker.start()
        await edge.publish_until(BEFORE + 900)  # ~3 s of readings with no ingest at all
        await edge.start_ingest()

    outcome = await strike(edge, "ingest down while the broker restarts", restart_without_ingest)
    assert not outcome.missing, outcome


async def test_ingest_killed_while_broker_down_loses_no_acked_reading(edge: EdgeCase) -> None:
    async def kill_ingest_meanwhile() -> None:
        edge.broker.stop()
        edge.kill_ingest()
        edge.broker.start()
        await edge.publish_until(BEFORE + 600)
        await edge.start_ingest()

    outcome = await strike(edge, "ingest kill -9 while the broker is down", kill_ingest_meanwhile)
    assert not outcome.missing, outcome


async def test_devices_wait_for_ingest_after_a_broker_restart(edge: EdgeCase) -> None:
    """Mosquitto forgets `$share` subscriptions on restart: devices wait until ingest is back."""
    device_id, password = next(iter(edge.devices.items()))
    port = edge.broker.port

    def connack() -> ReasonCode | None:
        return connack_of(device_id=device_id, password=password, port=port)

    before = await asyncio.to_thread(connack)
    assert before is not None, "a device was refused while ingest was subscribed"
    assert not before.is_failure, before
    edge.stop_ingest()
    edge.broker.stop()
    edge.broker.start()
    held = await asyncio.to_thread(connack)
    assert held is None or held.is_failure, "a device was accepted with no ingest subscribed"
    await edge.start_ingest()
    after = await asyncio.to_thread(connack)
    assert after is not None, "the device is still held after ingest subscribed again"
    assert not after.is_failure, after


async def test_attackers_take_nothing_and_ingest_keeps_its_session(edge: EdgeCase) -> None:
    """Rows 5 and 6 of issue 11, with a device's own valid credentials, while 50 publish."""
    (share_thief, ingest_thief, device_thief) = edge.spare.items()
    victim = next(iter(edge.devices))
    port = edge.broker.port
    edge.attackers = [
        Attacker(
            username=share_thief[0],
            password=share_thief[1],
            port=port,
            subscribe="$share/ingest/city/+/+/telemetry",
        ),
        Attacker(
            username=ingest_thief[0],
            password=ingest_thief[1],
            port=port,
            client_id=edge.ingest_client_id,
        ),
        Attacker(username=device_thief[0], password=device_thief[1], port=port, client_id=victim),
    ]
    fleet = await edge.start_fleet()
    for attacker in edge.attackers:
        attacker.start()
    await edge.publish_until(TOTAL)
    for attacker in edge.attackers:
        attacker.stop()
    victim_disconnects = fleet.devices[0].disconnects
    outcome = await edge.outcome()
    subscriber, id_thieves = edge.attackers[0], edge.attackers[1:]
    print(
        f"attackers: {outcome}; share subscriber granted {subscriber.granted} received "
        f"{len(subscriber.received)}; id thieves accepted "
        f"{[a.accepted for a in id_thieves]}; ingest reconnects {edge.ingest_reconnects()}; "
        f"victim device disconnects {victim_disconnects}"
    )
    assert not outcome.missing, outcome
    assert subscriber.granted == [], "a device joined ingest's share group"
    assert subscriber.received == [], "the broker routed readings to a device"
    assert [a.accepted for a in id_thieves] == [0, 0], "a device connected with another's id"
    assert all(a.refused > 0 for a in id_thieves), "the thieves never got an answer"
    assert edge.ingest_reconnects() == 0, "ingest lost its connection to an id thief"
    assert victim_disconnects == 0, "a device was kicked off by an id thief"
