"""Operations: /readyz and /metrics of a running `cityops rules`, SIGTERM, a bad rule file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from cityops.common.kinds import Kind
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import Feed, make_rules_env, reading

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
CITYOPS = Path(sys.executable).with_name("cityops")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [str(CITYOPS), "rules"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


async def test_readyz_metrics_and_sigterm(
    kafka_topics: Any, kafka: StackKafka, database_url: str, tmp_path: Path
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    port = free_port()
    log_path = tmp_path / "rules.log"
    process = spawn({**os.environ, **env.env(metrics_port=str(port))}, log_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> dict[str, Any] | None:
                try:
                    response = await http.get("/readyz")
                except httpx.TransportError:
                    return None
                return response.json() if response.status_code == 200 else None

            body = await wait_for(ready, timeout=30, interval=0.2, message="/readyz 200")
            assert body["checks"] == {
                "database": True,
                "kafka": True,
                "group_joined": True,
                "consumer": True,
            }
            device_id = f"wb-{uuid.uuid4().hex[:8]}"
            async with Feed(env) as feed:
                await feed.readings([reading(device_id, Kind.WASTEBIN, 1, fill_pct=99.0)])

            async def counted() -> bool:
                text = (await http.get("/metrics")).text
                return (
                    'cityops_rules_tickets_opened_total{priority="P3",rule="bin_full"} 1.0' in text
                )

            await wait_for(counted, timeout=20, interval=0.2, message="ticket counted")
            text = (await http.get("/metrics")).text
            for name in (
                "cityops_rules_events_total",
                "cityops_rules_consumer_lag_messages",
                "cityops_rules_processing_latency_seconds_bucket",
                "cityops_rules_open_tickets",
            ):
                assert name in text, name
            assert device_id not in text  # never a device id in a label
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [
        orjson.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
    ]
    stopped = [line for line in lines if line["msg"] == "rules stopped"]
    assert len(stopped) == 1 and stopped[0]["events_processed"] >= 1


def test_bad_rule_file_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - id: bin_full\n    kinds: [wastebin]\n    priority: P9\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [str(CITYOPS), "rules"],
        env={
            **os.environ,
            "CITYOPS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "CITYOPS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "CITYOPS_RULES_FILE": str(rules),
        },
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"{rules}: rules[0] (bin_full): field 'priority'" in result.stderr.decode()
