"""Ingest's side of the MQTT edge (issue 11, rows 4 and 7), on a broker of the test's own.

The broker is restarted here, so it is not the shared one: `own_broker` runs the Debian
package's Mosquitto (2.0.11) on a port of ingest's range (cityops.stack.mosquitto_instance),
anonymous, with persistence.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.ingest_support import (
    IngestCase,
    TopicReader,
    anonymous_publisher,
    broker_url,
    headers_of,
    ingest_in_process,
    own_broker,
    past,
    publish_all,
    reading,
    readyz,
    seqs_of,
    settings_from,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]

FAST = {"CITYOPS_INGEST_RATE_PER_S": "100000", "CITYOPS_INGEST_RATE_BURST": "100000"}


async def test_a_retained_message_is_dead_lettered_not_replayed_as_a_reading(
    case: IngestCase,
) -> None:
    """Row 7: 2.0.11 hands a retained message to every new subscription, RETAIN set."""
    device = case.device("wb")
    await case.seed({device: Kind.WASTEBIN})
    topic = f"city/wastebin/{device}/telemetry"
    stored = reading(device, "wastebin", 1, past(30), fill_pct=99.0)
    async with own_broker() as broker:
        publisher = await asyncio.to_thread(anonymous_publisher, broker)
        try:
            info = publisher.client.publish(topic, stored, qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, 10)
            env = case.replica_env(0, CITYOPS_MQTT_URL=broker_url(broker), **FAST)
            async with (
                TopicReader(case.kafka.admin, case.telemetry) as telemetry,
                TopicReader(case.kafka.admin, case.deadletter) as deadletter,
            ):
                async with ingest_in_process(env):  # subscribes: the broker replays `stored`
                    live = reading(device, "wastebin", 2, past(1))
                    await asyncio.to_thread(publish_all, publisher, [(topic, live)])
                    await telemetry.until(
                        lambda records: 2 in seqs_of(records, device),
                        within_s=20,
                        message="the live reading in telemetry",
                    )
                    await deadletter.until(
                        lambda records: any(r.key == device.encode() for r in records),
                        within_s=20,
                        message="the retained one dead-lettered",
                    )
                await telemetry.poll()
        finally:
            publisher.close()
    assert seqs_of(telemetry.records, device) == {2}  # the replay never became a reading
    (record,) = [r for r in deadletter.records if r.key == device.encode()]
    assert headers_of(record)["reason"] == b"retained"
    assert record.value == stored


async def test_every_broker_restart_is_followed_by_a_fast_reconnect_and_a_new_subscription(
    case: IngestCase,
) -> None:
    """Row 4: the old loop never reset its backoff, so each restart cost twice the last."""
    device = case.device("pk")
    await case.seed({device: Kind.PARKING})
    topic = f"city/parking/{device}/telemetry"
    gaps: list[float] = []
    async with own_broker() as broker:
        env = case.replica_env(0, CITYOPS_MQTT_URL=broker_url(broker), **FAST)
        port = settings_from(env).metrics_port

        def subscribed() -> bool:
            body = readyz(port)
            return bool(body and body["checks"]["mqtt"])

        async with (
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
            ingest_in_process(env),
        ):
            for seq in range(5):
                await asyncio.to_thread(broker.stop)
                await asyncio.to_thread(broker.start)
                back = time.monotonic()
                await wait_for(
                    lambda: asyncio.to_thread(subscribed),
                    timeout=30,
                    interval=0.02,
                    message=f"ingest subscribed again after restart {seq + 1}",
                )
                gaps.append(time.monotonic() - back)
                # Mosquitto 2.0.11 restores the session but not its $share subscription: this
                # reading reaches ingest only because ingest subscribed again on CONNACK.
                publisher = await asyncio.to_thread(anonymous_publisher, broker)
                try:
                    payload = reading(device, "parking", seq, past(10 - seq))
                    await asyncio.to_thread(publish_all, publisher, [(topic, payload)])
                finally:
                    publisher.close()
            await telemetry.until(
                lambda records: seqs_of(records, device) == set(range(5)),
                within_s=20,
                message="a reading after every restart",
            )
    # The old backoff gave 0.5, 1, 2, 4, 8 s; the first retry now comes after 0.1 s every time
    # (a generous bound: the broker may still be starting, and the machine is shared).
    assert max(gaps) < 4.0, gaps
    print(orjson.dumps({"reconnect_gaps_s": [round(g, 2) for g in gaps]}).decode())
