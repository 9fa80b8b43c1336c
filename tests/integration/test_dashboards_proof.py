"""Proof of issue 6: every dashboard and rule query works against the real stack.

The three services run as subprocesses on the ports the native Prometheus scrapes (9101, 9102,
8000; only this test uses them), a small fleet publishes through Mosquitto, Prometheus scrapes
and evaluates the rules. Then every PromQL expression of the dashboards and of the rules goes
through Prometheus's HTTP API (each parses, each dashboard query returns data), every rule group
is loaded and healthy, every target is up, and every SQL panel query runs against PostgreSQL as
the read-only role `cityops_grafana` and returns rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from cityops.common.kinds import Kind
from cityops.common.registry import Device, upsert_devices
from tests.dashboard_queries import (
    RULES,
    Query,
    dashboard_queries,
    expand_promql,
    expand_sql,
    load_dashboards,
    rule_queries,
)
from tests.helpers import MqttTestClient, wait_for
from tests.integration.conftest import MakeTopics, MqttSettings
from tests.integration.grafana_reader import reader_connection
from tests.integration.ingest_support import gateway, publish_all, reading
from tests.integration.kafka_support import StackKafka

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.mqtt,
    pytest.mark.postgres,
    pytest.mark.prometheus,
    pytest.mark.timeout(240),
]

REPO = Path(__file__).resolve().parents[2]
CITYOPS = REPO / ".venv" / "bin" / "cityops"
# job -> port, as in deploy/prometheus/prometheus.yml
SCRAPED = {"cityops-ingest": 9101, "cityops-rules": 9102, "cityops-api": 8000}
DISTRICTS = ("north", "south")
PUBLISH_EVERY_S = 2.0


def port_busy(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class FleetDevice:
    """One simulated device and how it behaves."""

    device_id: str
    kind: Kind
    district: str
    fields: dict[str, Any]


def fleet(tag: str) -> list[FleetDevice]:
    """Per district: 3 lights (one failed), 2 manholes (one cover open in the north), 2 bins
    (one full), 3 parking spots."""
    devices = []
    for district in DISTRICTS:
        d = district[0]
        devices += [
            FleetDevice(
                f"pf-{tag}-sl-{d}1",
                Kind.STREETLIGHT,
                district,
                {"lamp_on": True, "power_w": 42.0, "fault": "none"},
            ),
            FleetDevice(
                f"pf-{tag}-sl-{d}2",
                Kind.STREETLIGHT,
                district,
                {"lamp_on": True, "power_w": 55.0, "fault": "none"},
            ),
            FleetDevice(
                f"pf-{tag}-sl-{d}3",
                Kind.STREETLIGHT,
                district,
                {"lamp_on": False, "power_w": 0.0, "fault": "lamp_failure"},
            ),
            FleetDevice(
                f"pf-{tag}-mh-{d}1",
                Kind.MANHOLE,
                district,
                {
                    "cover_open": district == "north",
                    "tilt_deg": 2.0,
                    "water_level_pct": 35.0,
                    "gas_ppm": 3.0,
                },
            ),
            FleetDevice(
                f"pf-{tag}-mh-{d}2",
                Kind.MANHOLE,
                district,
                {"cover_open": False, "tilt_deg": 0.0, "water_level_pct": 12.0, "gas_ppm": 1.0},
            ),
            FleetDevice(
                f"pf-{tag}-wb-{d}1",
                Kind.WASTEBIN,
                district,
                {"fill_pct": 95.0, "temperature_c": 18.0},
            ),
            FleetDevice(
                f"pf-{tag}-wb-{d}2",
                Kind.WASTEBIN,
                district,
                {"fill_pct": 35.0, "temperature_c": 16.0},
            ),
        ]
        devices += [
            FleetDevice(f"pf-{tag}-pk-{d}{n}", Kind.PARKING, district, {"occupied": n != 3})
            for n in (1, 2, 3)
        ]
    return devices


async def register(database_url: str, devices: list[FleetDevice]) -> None:
    """Put the fleet in the registry, with positions around a city centre."""
    conn = await asyncpg.connect(database_url)
    try:
        await upsert_devices(
            conn,
            devices=[
                Device(
                    device_id=device.device_id,
                    kind=device.kind,
                    district=device.district,
                    lat=52.37 + 0.001 * index,
                    lon=4.89 + 0.001 * index,
                    reporting_interval_s=60,
                )
                for index, device in enumerate(devices)
            ],
        )
    finally:
        await conn.close()


async def publish_forever(
    client: MqttTestClient, devices: list[FleetDevice], tag: str, stop: asyncio.Event
) -> int:
    """Every PUBLISH_EVERY_S: one reading per device, plus three messages ingest must reject."""
    seq = 0
    while not stop.is_set():
        now = datetime.now(UTC)
        messages = [
            (
                f"city/{device.kind}/{device.device_id}/telemetry",
                reading(device.device_id, device.kind, seq, now, **device.fields),
            )
            for device in devices
        ]
        first = devices[0]
        messages += [
            (f"city/{first.kind}/{first.device_id}/telemetry", b"{not json"),
            (
                f"city/wastebin/pf-{tag}-ghost/telemetry",
                reading(f"pf-{tag}-ghost", "wastebin", seq, now),
            ),
            (
                f"city/{first.kind}/{first.device_id}/telemetry",
                reading(first.device_id, first.kind, seq, now, lamp_on="yes"),
            ),
        ]
        await asyncio.to_thread(publish_all, client, messages)
        seq += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=PUBLISH_EVERY_S)
    return seq


def start_service(name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """`cityops <name>` with only `env` as its CITYOPS_* settings; output to a log in /tmp."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    log_path = Path(f"/tmp/cityops-proof-{name}-{env['CITYOPS_INSTANCE_ID']}.log")
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [str(CITYOPS), name], env={**base, **env}, stdout=log_file, stderr=log_file
        )


@contextlib.asynccontextmanager
async def services(env_by_service: Mapping[str, Mapping[str, str]]) -> AsyncIterator[None]:
    """Run `cityops <service>` subprocesses; SIGTERM them (then SIGKILL) on exit."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, env in env_by_service.items():
            processes[name] = start_service(name, env)
        yield
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited early ({process.returncode})"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                await asyncio.to_thread(process.wait, 20)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 10)


def service_envs(
    stack_env: Mapping[str, str], database_url: str, topics: Mapping[str, str], tag: str
) -> dict[str, dict[str, str]]:
    """Environment of each service: this test's topics, database and groups; fixed ports."""
    kafka = StackKafka(stack_env)
    common = {
        "CITYOPS_DATABASE_URL": database_url,
        "CITYOPS_TOPIC_TELEMETRY": topics["city.telemetry.v1"],
        "CITYOPS_TOPIC_STATUS": topics["city.status.v1"],
        "CITYOPS_TOPIC_DEADLETTER": topics["city.deadletter.v1"],
        "CITYOPS_TOPIC_TICKETS": topics["city.tickets.v1"],
        "CITYOPS_TOPIC_DEVICES": topics["city.devices.v1"],
        "CITYOPS_TOPIC_PARTITIONS": "3",
        "CITYOPS_LOG_FORMAT": "json",
        "CITYOPS_SHUTDOWN_TIMEOUT_S": "10",
    }
    return {
        "ingest": {
            **common,
            **kafka.service("ingest").env(),
            "CITYOPS_INSTANCE_ID": f"proof-ingest-{tag}",
            "CITYOPS_MQTT_URL": stack_env["CITYOPS_MQTT_URL"],
            "CITYOPS_INGEST_MQTT_USERNAME": stack_env["CITYOPS_INGEST_MQTT_USERNAME"],
            "CITYOPS_INGEST_MQTT_PASSWORD": stack_env["CITYOPS_INGEST_MQTT_PASSWORD"],
            "CITYOPS_INGEST_MQTT_PROTOCOL": "5",
            "CITYOPS_INGEST_SESSION_EXPIRY_S": "0",  # leave no session behind at the broker
            "CITYOPS_INGEST_SHARE_GROUP": f"proof-{tag}",
            "CITYOPS_INGEST_CLIENT_ID": f"proof-ingest-{tag}",
            "CITYOPS_INGEST_REGISTRY_REFRESH_S": "0.5",
            "CITYOPS_METRICS_HOST": "127.0.0.1",
            "CITYOPS_METRICS_PORT": str(SCRAPED["cityops-ingest"]),
        },
        "rules": {
            **common,
            **kafka.service("rules").env(),
            "CITYOPS_INSTANCE_ID": f"proof-rules-{tag}",
            "CITYOPS_RULES_GROUP": f"rules-proof-{tag}",  # under the rules principal's ACL
            "CITYOPS_RULES_GAUGE_REFRESH_S": "1",
            "CITYOPS_RULES_REGISTRY_REFRESH_S": "1",
            "CITYOPS_RULES_SESSION_TIMEOUT_MS": "6000",
            "CITYOPS_METRICS_HOST": "127.0.0.1",
            "CITYOPS_METRICS_PORT": str(SCRAPED["cityops-rules"]),
        },
        "api": {
            **common,
            **kafka.service("api").env(),
            "CITYOPS_INSTANCE_ID": f"proof-api-{tag}",
            "CITYOPS_API_HOST": "127.0.0.1",
            "CITYOPS_API_PORT": str(SCRAPED["cityops-api"]),
            "CITYOPS_API_PROJECTOR_GROUP": f"api-projector-proof-{tag}",  # the API's ACL
            "CITYOPS_API_PROJECTOR_FETCH_TIMEOUT_MS": "200",
            "CITYOPS_API_BOOTSTRAP_KEY": stack_env["CITYOPS_API_BOOTSTRAP_KEY"],
        },
    }


class Prometheus:
    """The HTTP API of the stack's Prometheus."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def evaluate(self, query: Query, *, start: float) -> list[Any]:
        """The result of a dashboard or rule query as Grafana would run it now."""
        expr = expand_promql(query.text)
        now = time.time()
        if query.instant:
            data = await self.get("query", query=expr, time=now)
        else:
            data = await self.get("query_range", query=expr, start=start, end=now, step=5)
        result: list[Any] = data["result"]
        return result


def expected_rule_groups() -> set[str]:
    return {
        group["name"]
        for path in RULES.glob("*.yml")
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    }


async def rules_loaded(prometheus: Prometheus) -> bool:
    """Whether Prometheus has loaded every group of deploy/prometheus/rules."""
    groups = {group["name"] for group in (await prometheus.get("rules"))["groups"]}
    return expected_rule_groups() <= groups


async def test_every_dashboard_and_rule_query_works_against_the_real_stack(
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt_settings: MqttSettings,
) -> None:
    busy = {job: port for job, port in SCRAPED.items() if port_busy(port)}
    if busy:
        pytest.fail(
            f"ports {busy} are in use: the proof runs the services on the ports Prometheus "
            "scrapes; stop whatever listens there (e.g. `cityops stack services down`)",
            pytrace=False,
        )
    prometheus_url = stack_env["CITYOPS_PROMETHEUS_URL"]
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=prometheus_url, timeout=10) as http:
        prometheus = Prometheus(http)

        # Prometheus scrapes exactly these ports, and has our current rules loaded.
        targets = (await prometheus.get("targets"))["activeTargets"]
        scraped = {t["labels"]["job"]: t["scrapeUrl"] for t in targets}
        for job, port in SCRAPED.items():
            assert f":{port}/" in scraped.get(job, ""), f"Prometheus does not scrape {job}"
        # the rule files may have changed since the stack started: the lifecycle API re-reads
        # them (same config, so harmless for everyone else using this Prometheus)
        reload = await http.post("/-/reload")
        assert reload.status_code == 200, reload.text
        await wait_for(lambda: rules_loaded(prometheus), timeout=20, message="rules loaded")

        topics = await kafka_topics(
            "city.telemetry.v1", "city.status.v1", "city.deadletter.v1", "city.tickets.v1"
        )
        topics |= await kafka_topics("city.devices.v1", configs={"cleanup.policy": "compact"})
        devices = fleet(tag)
        await register(database_url, devices)
        started = time.time()

        client = gateway(mqtt_settings)
        stop_publishing = asyncio.Event()
        async with services(service_envs(stack_env, database_url, topics, tag)):
            publisher = asyncio.create_task(publish_forever(client, devices, tag, stop_publishing))
            try:
                await prove_prometheus(prometheus, start=started)
                await prove_sql(stack_env, database_url, start=started)
            finally:
                stop_publishing.set()
                published_rounds = await publisher
                client.close()
        assert published_rounds >= 3


async def prove_prometheus(prometheus: Prometheus, *, start: float) -> None:
    """Targets up, rule groups healthy, every query parses and every panel has data."""

    async def all_targets_up() -> bool:
        targets = (await prometheus.get("targets"))["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return all(health.get(job) == "up" for job in SCRAPED)

    await wait_for(all_targets_up, timeout=60, interval=1, message="every cityops target up")

    async def up_for_a_minute() -> bool:
        # a full minute of this run's scrapes: every [1m] window (the recording rules' rates)
        # now holds only samples of these processes, not of an earlier run on the same ports
        data = await prometheus.get(
            "query",
            query='count_over_time(up{job=~"cityops-.*"}[1m]) >= 10'
            ' and min_over_time(up{job=~"cityops-.*"}[1m]) == 1',
        )
        return {series["metric"]["job"] for series in data["result"]} >= set(SCRAPED)

    await wait_for(up_for_a_minute, timeout=120, interval=2, message="services up for 1 min")

    # every rule expression parses and evaluates without error (most alerts stay silent)
    for query in rule_queries():
        await prometheus.get("query", query=query.text)

    dashboards = [query for query in dashboard_queries() if query.language == "promql"]
    missing: list[str] = []

    async def every_panel_has_data() -> bool:
        results = [await prometheus.evaluate(query, start=start) for query in dashboards]
        missing[:] = [
            f"{query.source} / {query.title} [{query.ref}]: {query.text}"
            for query, result in zip(dashboards, results, strict=True)
            if not result
        ]
        return not missing

    try:
        await wait_for(every_panel_has_data, timeout=120, interval=3, message="panel data")
    except AssertionError as exc:
        raise AssertionError("dashboard queries without data:\n" + "\n".join(missing)) from exc

    groups = (await prometheus.get("rules"))["groups"]
    ours = [group for group in groups if group["name"] in expected_rule_groups()]
    for group in ours:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # rejects are counted by reason: the three bad messages per round are all there
    reasons = await prometheus.get(
        "query", query="sum by (reason) (cityops_ingest_rejected_messages_total)"
    )
    assert {r["metric"]["reason"] for r in reasons["result"]} >= {
        "not_json",
        "unknown_device",
        "schema",
    }


async def prove_sql(stack_env: Mapping[str, str], database_url: str, *, start: float) -> None:
    """Every SQL query (variables and panels) runs as cityops_grafana and returns rows."""
    boards = load_dashboards()
    async with reader_connection(stack_env, database_url) as reader:
        districts = [
            row["district"]
            for row in await reader.fetch("SELECT district FROM ops.districts ORDER BY 1")
        ]
        assert set(DISTRICTS) <= set(districts)
        empty: list[str] = []

        async def every_query_has_rows() -> bool:
            empty.clear()
            for board in boards.values():
                kind_options = next(v for v in board["templating"]["list"] if v["name"] == "kind")[
                    "options"
                ]
                kinds = [option["value"] for option in kind_options]
                for query in dashboard_queries({board["uid"]: board}):
                    if query.language != "sql":
                        continue
                    text = expand_sql(
                        query.text,
                        districts=districts,
                        kinds=kinds,
                        time_from=datetime.fromtimestamp(start, UTC) - timedelta(hours=1),
                        time_to=datetime.now(UTC) + timedelta(minutes=1),
                    )
                    rows = await reader.fetch(text)
                    if not rows:
                        empty.append(f"{query.source} / {query.title}: {text}")
            return not empty

        try:
            await wait_for(every_query_has_rows, timeout=60, interval=2, message="SQL rows")
        except AssertionError as exc:
            raise AssertionError("SQL panels without rows:\n" + "\n".join(empty)) from exc
