"""End to end with the real services as processes: provision over the API, publish over MQTT
with the new credentials, see the reading through ingest and the projector in the API; then
SIGTERM the API and watch it stop cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.helpers import MqttTestClient, wait_for
from tests.integration.api_support import BASE_TOPICS
from tests.integration.ingest_support import free_port, purge_session, reading, readyz
from tests.integration.kafka_support import StackKafka

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.mqtt]

REPO = Path(__file__).resolve().parents[2]
CITYOPS = REPO / ".venv" / "bin" / "cityops"


def spawn(command: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`cityops <command>` with exactly the test's CITYOPS_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full_env.update(env)
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [str(CITYOPS), command], env=full_env, stdout=log_file, stderr=log_file
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_mqtt_reading_reaches_the_api_and_sigterm_is_graceful(
    stack_env: Mapping[str, str],
    database_url: str,
    kafka_topics: Any,
    mqtt_settings: Any,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    api_key = f"key-{uuid.uuid4().hex}"
    topics = await kafka_topics(*BASE_TOPICS)
    api_port, ingest_port = free_port(), free_port()
    kafka = StackKafka(stack_env)
    common = {
        "CITYOPS_DATABASE_URL": database_url,
        "CITYOPS_TOPIC_TELEMETRY": topics["city.telemetry.v1"],
        "CITYOPS_TOPIC_STATUS": topics["city.status.v1"],
        "CITYOPS_TOPIC_DEADLETTER": topics["city.deadletter.v1"],
        "CITYOPS_TOPIC_TICKETS": topics["city.tickets.v1"],
        "CITYOPS_TOPIC_DEVICES": topics["city.devices.v1"],
        "CITYOPS_LOG_FORMAT": "json",
    }
    api_env = {
        **common,
        **kafka.service("api").env(),
        "CITYOPS_API_PORT": str(api_port),
        "CITYOPS_API_BOOTSTRAP_KEY": api_key,
        "CITYOPS_API_PROJECTOR_GROUP": f"api-projector-e2e-{tag}",
        "CITYOPS_API_PROJECTOR_FETCH_TIMEOUT_MS": "100",
        "CITYOPS_INSTANCE_ID": f"api-e2e-{tag}",
        **{
            key: stack_env[key]
            for key in ("CITYOPS_MQTT_DEVICE_PASSWORD_FILE", "CITYOPS_MQTT_PASSWORD_LOCK_FILE")
        },
    }
    ingest_client_id = f"ingest-e2e-{tag}"
    ingest_env = {
        **common,
        **kafka.service("ingest").env(),
        "CITYOPS_MQTT_URL": stack_env["CITYOPS_MQTT_URL"],
        "CITYOPS_INGEST_MQTT_USERNAME": stack_env["CITYOPS_INGEST_MQTT_USERNAME"],
        "CITYOPS_INGEST_MQTT_PASSWORD": stack_env["CITYOPS_INGEST_MQTT_PASSWORD"],
        "CITYOPS_INGEST_SHARE_GROUP": f"e2e-{tag}",
        "CITYOPS_INGEST_CLIENT_ID": ingest_client_id,
        "CITYOPS_INGEST_REGISTRY_REFRESH_S": "0.5",
        "CITYOPS_METRICS_PORT": str(ingest_port),
        "CITYOPS_INSTANCE_ID": f"ingest-e2e-{tag}",
    }
    api_log = tmp_path / "api.log"
    api = spawn("api", api_env, api_log)
    processes.append(api)
    base = f"http://127.0.0.1:{api_port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:

        async def api_ready() -> bool:
            try:
                return (await http.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(api_ready, timeout=30, interval=0.2, message="api ready")
        device_id = f"wb-e2e-{tag}"
        response = await http.post(
            "/v1/devices", json={"device_id": device_id, "kind": "wastebin", "district": "e2e"}
        )
        assert response.status_code == 201, response.text
        mqtt = response.json()["mqtt"]

        processes.append(spawn("ingest", ingest_env, tmp_path / "ingest.log"))

        async def ingest_ready() -> bool:
            body = await asyncio.to_thread(readyz, ingest_port)
            return bool(body and body["ready"])

        try:
            await wait_for(ingest_ready, timeout=30, interval=0.2, message="ingest ready")
            # The device itself, with the credentials the API just issued.
            device = MqttTestClient(
                mqtt_settings.host,
                mqtt_settings.port,
                mqtt["username"],
                mqtt["password"],
                protocol=MQTTProtocolVersion.MQTTv311,
            )
            assert not (await asyncio.to_thread(device.connect)).is_failure
            try:
                info = device.publish(
                    mqtt["telemetry_topic"],
                    reading(device_id, "wastebin", 42, datetime.now(UTC), fill_pct=88.5),
                )
                await asyncio.to_thread(info.wait_for_publish, 10)
            finally:
                device.close()

            async def visible() -> dict[str, Any] | None:
                body: dict[str, Any] = (await http.get(f"/v1/devices/{device_id}")).json()
                return body if body["state"] else None

            body = await wait_for(visible, timeout=30, interval=0.1, message="reading visible")
            assert body["state"]["seq"] == 42
            assert body["state"]["values"]["fill_pct"] == 88.5
            assert body["connectivity"]["online"] is True
        finally:
            await asyncio.to_thread(purge_session, mqtt_settings, ingest_client_id)

        # Graceful SIGTERM: exit 0, one summary line.
        api.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(api.wait, 30) == 0
        lines = [
            json.loads(line) for line in api_log.read_text().splitlines() if line.startswith("{")
        ]
        summary = [line for line in lines if line["msg"] == "api stopped"]
        assert len(summary) == 1
        assert summary[0]["requests"] >= 3
        assert any(line["msg"] == "projector stopped" for line in lines)
        assert api_key not in api_log.read_text()  # the key is never logged
