"""Ingest against real Mosquitto, Kafka and PostgreSQL: every kind accepted, every A5 reason."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from cityops.common.events import decode_status, decode_telemetry
from cityops.common.kinds import Kind
from tests.helpers import MqttTestClient
from tests.integration.conftest import ProvisionDevice
from tests.integration.ingest_support import (
    IngestCase,
    TopicReader,
    gateway,
    headers_of,
    ingest_in_process,
    metric_value,
    past,
    publish_all,
    reading,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]

NOT_AUTHORIZED = 0x87
PREFIX_BYTES = 4096  # CITYOPS_INGEST_DEADLETTER_PREFIX_BYTES' default


async def test_every_kind_accepted_and_every_reason_dead_lettered(case: IngestCase) -> None:
    kinds = {
        case.device("sl"): Kind.STREETLIGHT,
        case.device("mh"): Kind.MANHOLE,
        case.device("wb"): Kind.WASTEBIN,
        case.device("pk"): Kind.PARKING,
        case.device("rl"): Kind.PARKING,  # the rate-limited one
    }
    await case.seed(kinds)
    env = case.replica_env(0, CITYOPS_INGEST_RATE_BURST="2", CITYOPS_INGEST_RATE_PER_S="0.01")
    sl, mh, wb, pk, rl = kinds
    ghost = case.device("ghost")
    ts = past(5)
    valid = [
        (f"city/{kinds[d].value}/{d}/telemetry", reading(d, kinds[d].value, 1, ts))
        for d in (sl, mh, wb, pk)
    ]
    future = datetime.now(UTC) + timedelta(hours=2)
    bad = {
        "too_large": (f"city/wastebin/{wb}/telemetry", b"{" + b" " * 5000 + b"}"),
        "not_json": (f"city/wastebin/{wb}/telemetry", b"fill=87"),
        "schema": (f"city/wastebin/{wb}/telemetry", reading(wb, "wastebin", 2, ts, fill_pct=250)),
        "topic": (f"city/lamppost/{wb}/telemetry", reading(wb, "wastebin", 3, ts)),
        "id_mismatch": (f"city/wastebin/{wb}/telemetry", reading(sl, "wastebin", 4, ts)),
        "unknown_device": (
            f"city/parking/{ghost}/telemetry",
            reading(ghost, "parking", 1, ts),
        ),
        "clock_skew": (f"city/manhole/{mh}/telemetry", reading(mh, "manhole", 5, future)),
    }
    limited = [(f"city/parking/{rl}/telemetry", reading(rl, "parking", n, ts)) for n in range(3)]
    status = (f"city/streetlight/{sl}/status", b'{"online": false}')

    publisher = await asyncio.to_thread(gateway, case.mqtt)
    try:
        async with (
            ingest_in_process(env),
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
            TopicReader(case.kafka.admin, case.deadletter) as deadletter,
            TopicReader(case.kafka.admin, case.status) as statuses,
        ):
            await asyncio.to_thread(
                publish_all, publisher, [*valid, *bad.values(), *limited, status]
            )
            ours = {d.encode() for d in [*kinds, ghost]}

            def mine(records: list) -> list:  # type: ignore[type-arg]
                return [r for r in records if r.key in ours]

            await telemetry.until(
                lambda rs: len(mine(rs)) >= 6, within_s=20, message="valid readings"
            )
            await deadletter.until(
                lambda rs: len(mine(rs)) >= len(bad) + 1, within_s=20, message="dead letters"
            )
            await statuses.until(lambda rs: len(mine(rs)) >= 1, within_s=20, message="status")

            # The service is still alive after all of that: one more valid reading gets through.
            await asyncio.to_thread(
                publish_all, publisher, [(valid[0][0], reading(sl, "streetlight", 9, ts))]
            )
            await telemetry.until(
                lambda rs: (
                    9 in {orjson.loads(r.value)["seq"] for r in mine(rs) if r.key == sl.encode()}
                ),
                within_s=20,
                message="reading after the bad ones",
            )
            port = int(env["CITYOPS_METRICS_PORT"])
            rejected = await asyncio.to_thread(
                metric_value, port, "cityops_ingest_rejected_messages_total"
            )
            acked = await asyncio.to_thread(
                metric_value, port, "cityops_ingest_acked_messages_total"
            )
            assert rejected >= len(bad) + 1
            assert acked >= 6 + len(bad) + 2
    finally:
        await asyncio.to_thread(publisher.close)

    accepted = mine(telemetry.records)
    by_device: dict[str, list[int]] = {}
    for record in accepted:
        parsed = decode_telemetry(record.value)
        assert record.key == parsed.reading.device_id.encode()
        assert parsed.ingest_id == env["CITYOPS_INSTANCE_ID"]
        by_device.setdefault(parsed.reading.device_id, []).append(parsed.reading.seq)
    assert by_device == {sl: [1, 9], mh: [1], wb: [1], pk: [1], rl: [0, 1]}

    letters = {headers_of(r)["reason"].decode(): r for r in mine(deadletter.records)}
    assert set(letters) == {*bad, "rate_limited"}
    for reason, (topic, payload) in bad.items():
        record = letters[reason]
        headers = headers_of(record)
        if len(payload) <= PREFIX_BYTES:
            assert record.value == payload, reason  # the original bytes, untouched
        else:  # A5: a longer payload keeps its prefix, its size and its hash
            assert record.value == payload[:PREFIX_BYTES], reason
            assert headers["original_size"] == str(len(payload)).encode()
            assert headers["sha256"] == hashlib.sha256(payload).hexdigest().encode()
        assert headers["mqtt_topic"] == topic.encode()
        assert headers["detail"], reason
        assert datetime.fromisoformat(headers["received_at"].decode()).tzinfo is not None
    assert letters["unknown_device"].key == ghost.encode()
    assert letters["id_mismatch"].key == wb.encode()  # keyed by the topic's device
    assert letters["rate_limited"].value == limited[2][1]

    event = decode_status(mine(statuses.records)[0].value)
    assert (event.device_id, event.kind, event.online) == (sl, Kind.STREETLIGHT, False)


async def test_a_device_cannot_speak_for_another(
    case: IngestCase, provision_mqtt_device: ProvisionDevice
) -> None:
    mine_id, victim = case.device("wb-own"), case.device("wb-victim")
    await case.seed({mine_id: Kind.WASTEBIN, victim: Kind.WASTEBIN})
    password = await provision_mqtt_device(mine_id)
    env = case.replica_env(0)
    device = MqttTestClient(
        host=case.mqtt.host,
        port=case.mqtt.port,
        username=mine_id,
        password=password,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    assert not (await asyncio.to_thread(device.connect)).is_failure
    try:
        async with (
            ingest_in_process(env),
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
            TopicReader(case.kafka.admin, case.deadletter) as deadletter,
        ):
            ts = past(1)
            # 1) under the victim's topic: the broker's ACL refuses it outright
            spoof = device.publish(
                f"city/wastebin/{victim}/telemetry", reading(victim, "wastebin", 1, ts)
            )
            await asyncio.to_thread(spoof.wait_for_publish, 10)
            assert device.puback[spoof.mid].value == NOT_AUTHORIZED
            # 2) under its own topic but claiming the victim's id: dead-lettered as id_mismatch
            forged = device.publish(
                f"city/wastebin/{mine_id}/telemetry", reading(victim, "wastebin", 2, ts)
            )
            await asyncio.to_thread(forged.wait_for_publish, 10)
            honest = device.publish(
                f"city/wastebin/{mine_id}/telemetry", reading(mine_id, "wastebin", 3, ts)
            )
            await asyncio.to_thread(honest.wait_for_publish, 10)
            await deadletter.until(
                lambda rs: any(r.key == mine_id.encode() for r in rs),
                within_s=20,
                message="id_mismatch dead letter",
            )
            await telemetry.until(
                lambda rs: any(r.key == mine_id.encode() for r in rs),
                within_s=20,
                message="the honest reading",
            )
    finally:
        await asyncio.to_thread(device.close)
    letter = next(r for r in deadletter.records if r.key == mine_id.encode())
    assert headers_of(letter)["reason"] == b"id_mismatch"
    assert not any(r.key == victim.encode() for r in telemetry.records)
    assert not any(r.key == victim.encode() for r in deadletter.records)
