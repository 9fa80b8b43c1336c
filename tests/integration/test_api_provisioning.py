"""Provisioning against real Mosquitto: new credentials work, revoked ones stop working."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.stack.probes import mqtt_connect_reason
from tests.helpers import MqttTestClient, wait_for
from tests.integration.api_support import ApiCase, run_api

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.mqtt]


async def _connect_reason(mqtt: Any, username: str, password: str) -> str | None:
    return await asyncio.to_thread(
        mqtt_connect_reason, mqtt.host, mqtt.port, username=username, password=password
    )


async def _publish_reason(mqtt: Any, username: str, password: str, topic: str) -> int:
    """The PUBACK reason code of one QoS 1 publish (0 = accepted, 0x87 = not authorized)."""
    client = MqttTestClient(mqtt.host, mqtt.port, username, password)
    await asyncio.to_thread(client.connect)
    try:
        info = client.publish(topic, b'{"online": true}')
        reason = await wait_for(lambda: client.puback.get(info.mid), timeout=10, message="PUBACK")
        return int(reason.value)
    finally:
        client.close()


async def _devices_topic_records(access: KafkaAccess, topic: str, count: int) -> list[Any]:
    consumer = kafka_consumer(access, topic, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        while len(records) < count:
            fetched = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 10)
            for batch in fetched.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_provisioned_device_publishes_and_revoked_cannot(
    api_case: ApiCase, mqtt_settings: Any
) -> None:
    topics = api_case.topics
    settings = api_case.settings(
        mqtt=mqtt_settings,
        api_projector_enabled=False,
    )
    device_id = f"sl-{uuid.uuid4().hex[:10]}"
    other_id = f"sl-{uuid.uuid4().hex[:10]}"
    async with run_api(settings) as api, api.client() as http:
        response = await http.post(
            "/v1/devices",
            json={
                "device_id": device_id,
                "kind": "streetlight",
                "district": "north",
                "lat": 52.52,
                "lon": 13.40,
            },
        )
        assert response.status_code == 201, response.text
        created = response.json()
        mqtt = created["mqtt"]
        assert mqtt["username"] == device_id
        assert mqtt["telemetry_topic"] == f"city/streetlight/{device_id}/telemetry"
        password = mqtt["password"]
        # Stored only as a hash.
        assert password not in mqtt_settings.device_password_file.read_text()

        # The broker reloads on SIGHUP in its main loop: the login works a moment later.
        assert await wait_for(
            lambda: _ok(mqtt_settings, device_id, password), timeout=5, message="can connect"
        )
        assert (
            await _publish_reason(mqtt_settings, device_id, password, mqtt["status_topic"]) < 0x80
        )
        # Not under another device's id.
        assert (
            await _publish_reason(
                mqtt_settings, device_id, password, f"city/streetlight/{other_id}/status"
            )
            == 0x87
        )
        assert await _connect_reason(mqtt_settings, device_id, "wrong-password") is not None

        # The same id twice is a conflict, not a second set of credentials.
        again = await http.post("/v1/devices", json={"device_id": device_id, "kind": "manhole"})
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"

        # Disable revokes, enable restores the same password.
        response = await http.patch(f"/v1/devices/{device_id}", json={"enabled": False})
        assert response.status_code == 200, response.text
        assert await wait_for(
            lambda: _refused(mqtt_settings, device_id, password), timeout=5, message="refused"
        )
        response = await http.patch(f"/v1/devices/{device_id}", json={"enabled": True})
        assert response.status_code == 200
        assert await wait_for(
            lambda: _ok(mqtt_settings, device_id, password), timeout=5, message="restored"
        )

        # DELETE revokes within seconds.
        response = await http.delete(f"/v1/devices/{device_id}")
        assert response.status_code == 204
        assert await wait_for(
            lambda: _refused(mqtt_settings, device_id, password), timeout=5, message="revoked"
        )
        assert (await http.get(f"/v1/devices/{device_id}")).status_code == 404

        # Registry changes went to city.devices.v1: create, disable, enable, tombstone.
        records = await _devices_topic_records(api_case.kafka.admin, topics["city.devices.v1"], 4)
        mine = [r for r in records if r.key == device_id.encode()]
        assert [None if r.value is None else orjson.loads(r.value)["enabled"] for r in mine] == [
            True,
            False,
            True,
            None,
        ]


async def _ok(mqtt: Any, username: str, password: str) -> bool:
    return await _connect_reason(mqtt, username, password) is None


async def _refused(mqtt: Any, username: str, password: str) -> bool:
    return await _connect_reason(mqtt, username, password) is not None


async def test_import_keeps_valid_rows_and_reports_bad_ones(
    api_case: ApiCase, mqtt_settings: Any
) -> None:
    settings = api_case.settings(
        mqtt=mqtt_settings,
        api_projector_enabled=False,
    )
    prefix = f"imp{uuid.uuid4().hex[:8]}"
    csv_text = "\n".join(
        [
            "device_id,kind,district,lat,lon,metadata",
            f"{prefix}-1,wastebin,south,52.1,13.1,",
            f'{prefix}-2,parking,south,,,"{{""zone_limit_min"": 60}}"',
            f"{prefix}-3,rocket,south,,,",
            f"{prefix}-4,manhole,south,95,13.1,",
            f"{prefix}-1,wastebin,south,,,",
        ]
    )
    async with run_api(settings) as api, api.client() as http:
        response = await http.post(
            "/v1/devices:import", content=csv_text, headers={"Content-Type": "text/csv"}
        )
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["created"] == 2
        assert result["failed"] == 3
        assert [(e["row"], e["errors"][0]["field"]) for e in result["errors"]] == [
            (3, "kind"),
            (4, "lat"),
            (5, "device_id"),
        ]
        credentials = {c["device_id"]: c["password"] for c in result["credentials"]}
        assert set(credentials) == {f"{prefix}-1", f"{prefix}-2"}
        assert await wait_for(
            lambda: _ok(mqtt_settings, f"{prefix}-2", credentials[f"{prefix}-2"]),
            timeout=5,
            message="imported device can connect",
        )
        device = (await http.get(f"/v1/devices/{prefix}-2")).json()
        assert device["metadata"] == {"zone_limit_min": 60}

        # JSON lines, re-importing an existing device updates it and keeps its credentials.
        lines = "\n".join(
            [
                orjson.dumps(
                    {"device_id": f"{prefix}-1", "kind": "wastebin", "district": "east"}
                ).decode(),
                orjson.dumps({"device_id": f"{prefix}-2", "kind": "manhole"}).decode(),
                "not json",
            ]
        )
        response = await http.post(
            "/v1/devices:import", content=lines, headers={"Content-Type": "application/x-ndjson"}
        )
        result = response.json()
        assert (result["created"], result["updated"], result["failed"]) == (0, 1, 2)
        assert result["credentials"] == []
        assert (await http.get(f"/v1/devices/{prefix}-1")).json()["district"] == "east"
        assert await _ok(mqtt_settings, f"{prefix}-1", credentials[f"{prefix}-1"])

        bad_type = await http.post(
            "/v1/devices:import", content="{}", headers={"Content-Type": "application/json"}
        )
        assert bad_type.status_code == 415
        for device_id in credentials:
            assert (await http.delete(f"/v1/devices/{device_id}")).status_code == 204
