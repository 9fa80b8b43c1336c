"""End-to-end latency under a steady city load: sensor publish -> state / ticket in the API.

Setup, all uuid-named so it never touches the demo or other tests: a fresh database with the
migrations, fresh Kafka topics, ingest / rules / api started as subprocesses (`cityops ...`)
with their own consumer groups and shared-subscription group, and `cityops simulate`
holding the load (N devices at R msgs/s) in its own process.

Measurement: a probe client in this process publishes readings for a few extra waste bins in
a district of their own (`bench-probe`), through the same broker account as the load:
- state probes: a reading with the next seq; visible when `GET /v1/devices/{id}` of that bin
  shows that seq;
- ticket probes: a reading with temperature_c 85 (rule bin_fire); visible when
  `GET /v1/tickets?district=...` lists a new ticket for the bin; a cooling reading follows
  so the ticket auto-resolves and the bin can fire again.
Each endpoint is polled on its own loop only while a probe of its sort is pending, every
`poll_interval_s`, so the latency reported is an upper bound: the true value is up to one poll
interval plus one request less. Probes are a few per second against a load of thousands: they
do not shape it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from bench.report import SuiteResult
from bench.stats import is_number, percentile
from cityops.common.kafka import KafkaAccess, kafka_admin, kafka_consumer, scratch_topic
from cityops.common.kinds import Kind
from cityops.common.migrate import apply_migrations
from cityops.common.mqtt_sessions import purge_session
from cityops.common.registry import Device, upsert_devices
from cityops.common.scratch import drop_database
from cityops.simulator.behaviours import format_ts
from cityops.simulator.city import DEFAULT_PLACE, PLACES, build_city
from cityops.simulator.provision import provision_direct
from cityops.simulator.publisher import MqttPublisher, PublishStats

log = logging.getLogger(__name__)

PROBE_DISTRICT = "bench-probe"
E2E_TARGETS = {"state_p99_ms": ("<=", 100.0), "ticket_p99_ms": ("<=", 250.0)}
TOPIC_PARTITIONS = 12
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class E2EConfig:
    """Size of the load and of the measurement."""

    devices_per_kind: int = 2500  # 10,000 devices
    rate: float = 2000.0
    warmup_s: float = 10.0
    window_s: float = 40.0
    windows: int = 3
    probe_bins: int = 40
    probe_interval_s: float = 0.2
    poll_interval_s: float = 0.01
    state_timeout_s: float = 5.0
    ticket_timeout_s: float = 10.0
    ready_timeout_s: float = 90.0


FULL = E2EConfig()
QUICK = E2EConfig(devices_per_kind=250, rate=500.0, warmup_s=4.0, window_s=8.0, probe_bins=20)


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class Service:
    """A cityops subprocess with its log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    ready_url: str | None

    def tail(self, lines: int = 15) -> str:
        """The end of its log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class WindowTally:
    """Samples of one measurement window."""

    state_ms: list[float] = field(default_factory=list)
    ticket_ms: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)
    stream_state_ms: list[float] = field(default_factory=list)
    stream_ticket_ms: list[float] = field(default_factory=list)
    puback_ms: list[float] = field(default_factory=list)
    state_timeouts: int = 0
    ticket_timeouts: int = 0


class Prober:
    """Publishes probe readings and watches the API for them."""

    def __init__(
        self,
        *,
        publisher: MqttPublisher,
        http: httpx.AsyncClient,
        probe_ids: list[str],
        config: E2EConfig,
    ) -> None:
        self._publisher = publisher
        self._http = http
        self._config = config
        half = max(1, len(probe_ids) // 2)
        self._state_bins = probe_ids[:half]
        self._ticket_bins = probe_ids[half:] or probe_ids[:1]
        self._seq: dict[str, int] = dict.fromkeys(probe_ids, 0)
        self._pending_state: dict[str, tuple[int, float]] = {}
        self._pending_ticket: dict[str, float] = {}
        self._open_ticket_bins: set[str] = set()
        self._last_trigger: dict[str, float] = {}
        self._seen_tickets: set[int] = set()
        # the same probes, as seen on /v1/stream (Server-Sent Events)
        self._stream_state: dict[tuple[str, int], float] = {}
        self._stream_ticket: dict[str, float] = {}
        self._work = asyncio.Event()
        self._cursor = 0
        self.tally = WindowTally()

    async def _publish(self, device_id: str, **fields: Any) -> float:
        self._seq[device_id] += 1
        body = {
            "device_id": device_id,
            "kind": "wastebin",
            "ts": format_ts(datetime.now(UTC)),
            "seq": self._seq[device_id],
            "fill_pct": 12.0,
            **fields,
        }
        started = time.perf_counter()
        await self._publisher.publish(f"city/wastebin/{device_id}/telemetry", orjson.dumps(body))
        return started

    async def prime(self) -> None:
        """Seed every probe bin with a cool reading (and learn the tickets that exist)."""
        for device_id in self._state_bins + self._ticket_bins:
            await self._publish(device_id, temperature_c=15.0)
        await self._poll_tickets(initial=True)

    async def _probe_state(self) -> None:
        free = [d for d in self._state_bins if d not in self._pending_state]
        if not free:
            return
        device_id = free[self._cursor % len(free)]
        seq = self._seq[device_id] + 1
        started = await self._publish(device_id, temperature_c=15.0)
        self._pending_state[device_id] = (seq, started)
        self._stream_state[(device_id, seq)] = started

    async def _probe_ticket(self) -> None:
        now = time.perf_counter()
        free = [
            d
            for d in self._ticket_bins
            if d not in self._pending_ticket
            and d not in self._open_ticket_bins
            and now - self._last_trigger.get(d, 0.0) > 2.0
        ]
        if not free:
            return
        device_id = free[self._cursor % len(free)]
        self._last_trigger[device_id] = now
        started = await self._publish(device_id, temperature_c=85.0)
        self._pending_ticket[device_id] = started
        self._stream_ticket[device_id] = started

    async def probe_loop(self, *, until: float) -> None:
        """One probe every probe interval, alternating state and ticket probes."""
        while time.perf_counter() < until:
            self._cursor += 1
            if self._cursor % 2:
                await self._probe_state()
            else:
                await self._probe_ticket()
            self._work.set()
            await asyncio.sleep(self._config.probe_interval_s)

    async def _get(self, path: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        sent = time.perf_counter()
        response = await self._http.get(path, params=dict(params))
        received = time.perf_counter()
        response.raise_for_status()
        self.tally.poll_ms.append((received - sent) * 1000)
        body: dict[str, Any] = response.json()
        return body, received

    async def _poll_state(self) -> None:
        # One GET of each pending bin (`/v1/devices/{id}`, the cheapest read of a state):
        # usually one, since a state probe is sent every other probe interval.
        pending = list(self._pending_state)
        replies = await asyncio.gather(*(self._get(f"/v1/devices/{d}", {}) for d in pending))
        for device_id, (body, received) in zip(pending, replies, strict=True):
            probe = self._pending_state.get(device_id)
            state = body.get("state")
            if probe is not None and state is not None and state["seq"] >= probe[0]:
                self.tally.state_ms.append((received - probe[1]) * 1000)
                del self._pending_state[device_id]

    async def _poll_tickets(self, *, initial: bool = False) -> None:
        page, received = await self._get("/v1/tickets", {"district": PROBE_DISTRICT, "limit": 1000})
        open_now: set[str] = set()
        for ticket in page["items"]:
            device_id = ticket["device_id"]
            if ticket["status"] not in ("resolved", "closed"):
                open_now.add(device_id)
            if ticket["id"] in self._seen_tickets:
                continue
            self._seen_tickets.add(ticket["id"])
            started = self._pending_ticket.pop(device_id, None)
            if started is not None and not initial and ticket["rule"] == "bin_fire":
                self.tally.ticket_ms.append((received - started) * 1000)
                await self._publish(device_id, temperature_c=15.0)  # fire out: auto-resolve
        self._open_ticket_bins = open_now

    def _expire(self) -> None:
        now = time.perf_counter()
        for device_id, (_, started) in list(self._pending_state.items()):
            if now - started > self._config.state_timeout_s:
                del self._pending_state[device_id]
                self.tally.state_timeouts += 1
        for device_id, started in list(self._pending_ticket.items()):
            if now - started > self._config.ticket_timeout_s:
                del self._pending_ticket[device_id]
                self.tally.ticket_timeouts += 1
        for key, started in list(self._stream_state.items()):
            if now - started > self._config.state_timeout_s:
                del self._stream_state[key]
        for device_id, started in list(self._stream_ticket.items()):
            if now - started > self._config.ticket_timeout_s:
                del self._stream_ticket[device_id]

    async def watch_loop(self, *, until: float) -> None:
        """Poll the API for pending state and ticket probes, each on its own loop."""
        await asyncio.gather(
            self._watch(until=until, pending=self._pending_state, poll=self._poll_state),
            self._watch(until=until, pending=self._pending_ticket, poll=self._poll_tickets),
        )

    async def _watch(
        self,
        *,
        until: float,
        pending: Mapping[str, object],
        poll: Callable[[], Awaitable[None]],
    ) -> None:
        """Poll while a probe of this sort is pending; sleep on an event while none is."""
        while time.perf_counter() < until or pending:
            if not pending:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), timeout=1.0)
                continue
            await poll()
            self._expire()
            await asyncio.sleep(self._config.poll_interval_s)

    def on_stream_event(self, event_type: str, data: Mapping[str, Any], received: float) -> None:
        """Match a /v1/stream event to a pending probe."""
        device_id = str(data.get("device_id", ""))
        if event_type == "state":
            started = self._stream_state.pop((device_id, int(data.get("seq", -1))), None)
            if started is not None:
                self.tally.stream_state_ms.append((received - started) * 1000)
        elif (event_type, data.get("rule"), data.get("status")) == ("ticket", "bin_fire", "open"):
            started = self._stream_ticket.pop(device_id, None)
            if started is not None:
                self.tally.stream_ticket_ms.append((received - started) * 1000)

    async def stream_loop(self, connected: asyncio.Event) -> None:
        """Follow /v1/stream for the probe district until cancelled."""
        params = {"district": PROBE_DISTRICT, "type": ["state", "ticket"]}
        async with self._http.stream("GET", "/v1/stream", params=params, timeout=None) as response:
            response.raise_for_status()
            event_type = ""
            async for line in response.aiter_lines():
                if line.startswith(": connected"):
                    connected.set()
                elif line.startswith("event:"):
                    event_type = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    received = time.perf_counter()
                    self.on_stream_event(event_type, orjson.loads(line[5:]), received)

    def next_window(self) -> WindowTally:
        """Hand over this window's samples and start a new tally."""
        done, self.tally = self.tally, WindowTally()
        done.puback_ms = list(self._publisher.ack_latencies_ms)
        self._publisher.ack_latencies_ms.clear()
        return done


async def _telemetry_offset(consumer: AIOKafkaConsumer, topic: str) -> int:
    partitions = range(TOPIC_PARTITIONS)
    offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    return int(sum(offsets.values()))


def _window_result(
    tally: WindowTally, *, window_s: float, telemetry: int, cpu: Mapping[str, float]
) -> dict[str, Any]:
    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 1)

    result: dict[str, Any] = {
        "pipeline_msgs_per_s": round(telemetry / window_s),
        "state_p50_ms": ms(tally.state_ms, 50),
        "state_p99_ms": ms(tally.state_ms, 99),
        "state_max_ms": ms(tally.state_ms, 100),
        "state_samples": len(tally.state_ms),
        "state_timeouts": tally.state_timeouts,
        "ticket_p50_ms": ms(tally.ticket_ms, 50),
        "ticket_p99_ms": ms(tally.ticket_ms, 99),
        "ticket_max_ms": ms(tally.ticket_ms, 100),
        "ticket_samples": len(tally.ticket_ms),
        "ticket_timeouts": tally.ticket_timeouts,
        "api_poll_request_p50_ms": ms(tally.poll_ms, 50),
        "stream_state_p50_ms": ms(tally.stream_state_ms, 50),
        "stream_state_p99_ms": ms(tally.stream_state_ms, 99),
        "stream_ticket_p50_ms": ms(tally.stream_ticket_ms, 50),
        "stream_ticket_p99_ms": ms(tally.stream_ticket_ms, 99),
        # the broker's own answer time for the probes (publish -> PUBACK)
        "mqtt_puback_p50_ms": ms(tally.puback_ms, 50),
        "mqtt_puback_p99_ms": ms(tally.puback_ms, 99),
        "mqtt_puback_max_ms": ms(tally.puback_ms, 100),
    }
    result.update({f"cpu_{name}_pct": round(value, 1) for name, value in cpu.items()})
    # how busy the whole machine was (2 cores: above 2 means work was queueing for a CPU)
    result["machine_load_1m"] = round(os.getloadavg()[0], 2)
    return result


async def _start(
    name: str, argv: list[str], env: Mapping[str, str], logs: Path, ready_url: str | None
) -> Service:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as handle:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=handle,
            stderr=asyncio.subprocess.STDOUT,
        )
    return Service(name, process, log_path, ready_url)


async def _wait_ready(service: Service, http: httpx.AsyncClient, *, timeout_s: float) -> None:
    if service.ready_url is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.returncode is not None:
            raise RuntimeError(f"{service.name} exited early:\n{service.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(service.ready_url, timeout=2.0)).status_code == 200:
                return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{service.name} not ready within {timeout_s:.0f} s:\n{service.tail()}")


async def _stop(service: Service, *, timeout_s: float = 20.0) -> None:
    process = service.process
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        log.warning("%s did not stop on SIGTERM; killing it", service.name)
        process.kill()
        await process.wait()


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def run_e2e_bench(  # noqa: PLR0915 - one setup/measure/teardown script reads best whole
    env: Mapping[str, str], *, config: E2EConfig = FULL, stack_dir: Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the end-to-end benchmark; returns one result per window and the pooled summary."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"e2e{tag}-"
    kafka = KafkaAccess.from_env(env, principal="admin")
    admin_url = env["CITYOPS_DATABASE_URL"]
    db_name = f"bench_e2e_{tag}"
    db_url = _with_database(admin_url, db_name)
    topics = {
        key: scratch_topic(key, f"bench-e2e-{tag}")
        for key in ("telemetry", "status", "deadletter", "tickets", "devices")
    }
    api_key = env.get("CITYOPS_API_BOOTSTRAP_KEY") or uuid.uuid4().hex
    cityops = shutil.which("cityops") or str(Path(sys.executable).with_name("cityops"))
    logs = Path(tempfile.mkdtemp(prefix=f"cityops-bench-{tag}-"))
    ports = {"ingest": free_port(), "rules": free_port(), "api": free_port()}

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    base_env.update(env)
    # never touch the broker's credential files from a benchmark
    for key in list(base_env):
        if key.startswith("CITYOPS_MQTT_") and key.endswith("_FILE"):
            del base_env[key]
    base_env.update(
        {
            "CITYOPS_DATABASE_URL": db_url,
            "CITYOPS_TOPIC_TELEMETRY": topics["telemetry"],
            "CITYOPS_TOPIC_STATUS": topics["status"],
            "CITYOPS_TOPIC_DEADLETTER": topics["deadletter"],
            "CITYOPS_TOPIC_TICKETS": topics["tickets"],
            "CITYOPS_TOPIC_DEVICES": topics["devices"],
            "CITYOPS_LOG_LEVEL": "WARNING",
            "CITYOPS_LOG_FORMAT": "json",
            "CITYOPS_API_BOOTSTRAP_KEY": api_key,
        }
    )
    service_env = {
        "ingest": {
            "CITYOPS_INGEST_SHARE_GROUP": f"bench-{tag}",
            "CITYOPS_INGEST_CLIENT_ID": f"ingest-bench-{tag}",
            "CITYOPS_INGEST_SESSION_EXPIRY_S": "60",
            "CITYOPS_METRICS_PORT": str(ports["ingest"]),
        },
        "rules": {
            "CITYOPS_RULES_GROUP": f"rules-bench-{tag}",
            "CITYOPS_METRICS_PORT": str(ports["rules"]),
        },
        "api": {
            "CITYOPS_API_PORT": str(ports["api"]),
            "CITYOPS_API_PROJECTOR_GROUP": f"api-projector-bench-{tag}",
        },
    }
    services: list[Service] = []
    admin_db = await asyncpg.connect(admin_url)
    admin_kafka = kafka_admin(kafka)
    await admin_kafka.start()
    consumer = kafka_consumer(kafka)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ports['api']}",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10.0,
    )
    publisher: MqttPublisher | None = None
    stream_task: asyncio.Task[None] | None = None
    try:
        # --- fresh database, topics, fleet ---------------------------------------------
        await admin_db.execute(f'CREATE DATABASE "{db_name}"')
        place = PLACES[DEFAULT_PLACE]
        city = build_city(
            place=place, devices_per_kind=config.devices_per_kind, id_prefix=prefix, seed=1
        )
        probe_ids = [f"{prefix}probe-{n:03d}" for n in range(config.probe_bins)]
        conn = await asyncpg.connect(db_url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        started = time.monotonic()
        await provision_direct(database_url=db_url, city=city)
        conn = await asyncpg.connect(db_url)
        try:
            await upsert_devices(
                conn,
                devices=[
                    Device(
                        device_id=d,
                        kind=Kind.WASTEBIN,
                        district=PROBE_DISTRICT,
                        reporting_interval_s=600,
                        lat=place.lat,
                        lon=place.lon,
                    )
                    for d in probe_ids
                ],
            )
        finally:
            await conn.close()
        provision_s = time.monotonic() - started
        await admin_kafka.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=TOPIC_PARTITIONS,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"} if key == "devices" else {},
                )
                for key, name in topics.items()
            ]
        )
        await consumer.start()

        # --- services ------------------------------------------------------------------
        for name in ("ingest", "rules", "api"):
            child_env = {**base_env, **service_env[name]}
            url_port = ports[name]
            services.append(
                await _start(
                    name,
                    [cityops, name],
                    child_env,
                    logs,
                    f"http://127.0.0.1:{url_port}/readyz",
                )
            )
        for service in services:
            await _wait_ready(service, http, timeout_s=config.ready_timeout_s)
        total_s = config.warmup_s + config.windows * config.window_s + 30.0
        simulate = [
            cityops, "simulate",
            "--devices-per-kind", str(config.devices_per_kind),
            "--rate", f"{config.rate:g}",
            "--duration", f"{total_s:g}",
            "--id-prefix", prefix,
            "--seed", "1",
            "--no-provision", "--no-incidents", "--no-radio-effects",
            "--progress-interval", "5",
            "--client-id-prefix", f"bench-sim-{tag}",
        ]  # fmt: skip
        sim_env = {**base_env, "CITYOPS_LOG_LEVEL": "INFO"}
        services.append(await _start("simulate", simulate, sim_env, logs, None))

        stats = PublishStats()
        publisher = MqttPublisher(
            host=urlsplit(env["CITYOPS_MQTT_URL"]).hostname or "127.0.0.1",
            port=urlsplit(env["CITYOPS_MQTT_URL"]).port or 1883,
            client_id=f"bench-probe-{tag}",
            username=env["CITYOPS_SIMULATOR_MQTT_USERNAME"],
            password=env["CITYOPS_SIMULATOR_MQTT_PASSWORD"],
            stats=stats,
            max_outstanding=100,
            track_ack_latency=True,
        )
        await publisher.connect()
        prober = Prober(publisher=publisher, http=http, probe_ids=probe_ids, config=config)
        stream_connected = asyncio.Event()
        stream_task = asyncio.create_task(prober.stream_loop(stream_connected))
        await asyncio.wait_for(stream_connected.wait(), timeout=30.0)
        await prober.prime()
        await asyncio.sleep(config.warmup_s)  # the load reaches its steady state
        prober.next_window()

        # --- measurement windows ---------------------------------------------------------
        pids = {s.name: s.process.pid for s in services}
        stack_root = stack_dir or Path.cwd() / ".stack"
        # Mosquitto runs under a supervisor: the broker's own pid is in mosquitto-child.pid.
        for server, pid_file in (("mosquitto", "mosquitto-child.pid"), ("kafka", "kafka.pid")):
            pid = _pid_from_file(stack_root / "run" / pid_file)
            if pid is not None:
                pids[server] = pid
        windows: list[dict[str, Any]] = []
        pooled = WindowTally()
        for number in range(config.windows):
            for service in services:
                if service.process.returncode is not None:
                    raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
            log.info("e2e window %d/%d", number + 1, config.windows)
            cpu_before = {name: proc_cpu_s(pid) for name, pid in pids.items()}
            offset_before = await _telemetry_offset(consumer, topics["telemetry"])
            window_start = time.perf_counter()
            until = window_start + config.window_s
            await asyncio.gather(prober.probe_loop(until=until), prober.watch_loop(until=until))
            elapsed = time.perf_counter() - window_start
            offset_after = await _telemetry_offset(consumer, topics["telemetry"])
            cpu: dict[str, float] = {}
            for name, pid in pids.items():
                before, after = cpu_before.get(name), proc_cpu_s(pid)
                if before is not None and after is not None:
                    cpu[name] = (after - before) / elapsed * 100
            tally = prober.next_window()
            pooled.state_ms += tally.state_ms
            pooled.ticket_ms += tally.ticket_ms
            pooled.poll_ms += tally.poll_ms
            pooled.stream_state_ms += tally.stream_state_ms
            pooled.stream_ticket_ms += tally.stream_ticket_ms
            pooled.puback_ms += tally.puback_ms
            pooled.state_timeouts += tally.state_timeouts
            pooled.ticket_timeouts += tally.ticket_timeouts
            windows.append(
                _window_result(
                    tally, window_s=elapsed, telemetry=offset_after - offset_before, cpu=cpu
                )
            )
        summary = _window_result(pooled, window_s=1.0, telemetry=0, cpu={})
        summary.pop("pipeline_msgs_per_s")
        summary["devices"] = len(city.devices)
        summary["target_rate_msgs_per_s"] = config.rate
        summary["provision_s"] = round(provision_s, 2)
        summary["probe_publish_errors"] = stats.errors
        return windows, summary
    finally:
        if stream_task is not None:
            stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await stream_task
        if publisher is not None:
            await publisher.close(timeout=2.0)
        for service in reversed(services):
            await _stop(service)
        if services:
            # ingest's session would queue every later publish at the broker for days
            mqtt = urlsplit(env["CITYOPS_MQTT_URL"])
            await asyncio.to_thread(
                purge_session,
                host=mqtt.hostname or "127.0.0.1",
                port=mqtt.port or 1883,
                username=env["CITYOPS_INGEST_MQTT_USERNAME"],
                password=env["CITYOPS_INGEST_MQTT_PASSWORD"],
                client_id=service_env["ingest"]["CITYOPS_INGEST_CLIENT_ID"],
            )
        await http.aclose()
        await consumer.stop()
        with contextlib.suppress(Exception):
            await admin_kafka.delete_topics(list(topics.values()))
        await admin_kafka.close()
        await drop_database(admin_db, db_name)
        await admin_db.close()
        log.info("e2e logs kept in %s", logs)


async def run_e2e_suite(
    env: Mapping[str, str],
    *,
    quick: bool,
    runs: int,
    devices_per_kind: int | None = None,
    rate: float | None = None,
    warmup_s: float | None = None,
    window_s: float | None = None,
    probe_bins: int | None = None,
) -> SuiteResult:
    """The end-to-end suite: `runs` measurement windows under one steady load; the options
    given replace those of the quick or full size."""
    base = QUICK if quick else FULL
    config = replace(
        base,
        windows=runs,
        devices_per_kind=base.devices_per_kind if devices_per_kind is None else devices_per_kind,
        rate=base.rate if rate is None else rate,
        warmup_s=base.warmup_s if warmup_s is None else warmup_s,
        window_s=base.window_s if window_s is None else window_s,
        probe_bins=base.probe_bins if probe_bins is None else probe_bins,
    )
    title = "End to end: sensor publish -> state / ticket visible in the API"
    source = "bench/e2e.py: run_e2e_bench()"
    try:
        windows, pooled = await run_e2e_bench(env, config=config)
    except Exception as exc:  # the report says what broke instead of inventing numbers
        log.exception("e2e benchmark failed")
        return SuiteResult("e2e", title, source, status="failed", detail=f"{exc}"[:1500])
    notes = [
        f"Load: `cityops simulate` with {pooled['devices']:,} devices at "
        f"{config.rate:,.0f} msgs/s (gateway mode, QoS 1); ingest, rules and api as "
        f"subprocesses on a fresh database and fresh topics; {config.windows} windows of "
        f"{config.window_s:.0f} s after {config.warmup_s:.0f} s of warm-up.",
        f"Probes: {config.probe_bins} extra bins in district `{PROBE_DISTRICT}`, one probe "
        f"every {config.probe_interval_s:g} s alternating state and ticket (bin_fire); while a "
        "probe is pending the API is polled every "
        f"{config.poll_interval_s * 1000:g} ms (`GET /v1/devices/{{id}}` of the pending bin for "
        "state, `GET /v1/tickets?district=` for tickets, each on its own loop), so latencies "
        "are upper bounds (true value up to one poll interval + one request less).",
        "Pooled over all windows: "
        + ", ".join(
            f"{key} {value:g}" if is_number(value) else f"{key} {value}"
            for key, value in pooled.items()
        )
        + ".",
        "`stream_*` are the same probes seen on `/v1/stream` (Server-Sent Events, fed from "
        "Kafka by the API): no polling error, but before the state is written to PostgreSQL.",
        "`mqtt_puback_*` is the broker's publish -> PUBACK time for the probes: when it has "
        "seconds-long outliers, the broker itself stalled (e.g. while saving its persistence "
        "file) and every path downstream inherits them.",
        "`pipeline_msgs_per_s` counts records reaching the telemetry topic during the window; "
        "`cpu_*_pct` is CPU time of each process over the window (100 = one core).",
    ]
    return SuiteResult("e2e", title, source, runs=windows, notes=notes, targets=E2E_TARGETS)
