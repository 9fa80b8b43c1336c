"""`cityops simulate`: a simulated city publishing over MQTT 5 at QoS 1.

    cityops simulate --devices-per-kind 50 --accelerate 60 --faults all
    cityops simulate --devices-per-kind 2500 --rate 2000 --duration 60 --no-incidents

Settings (broker, credentials, database or API) come from `CITYOPS_*` variables; the shape
of the city and the load come from flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from asyncpg import PostgresError
from prometheus_client import CollectorRegistry, Counter, Gauge

from cityops.api.devices.credentials import BrokerFiles
from cityops.common.kinds import RejectReason
from cityops.common.ops import serve_ops, stop_on_signals
from cityops.common.service import (
    ConfigError,
    ServiceParser,
    entry_point,
    load_settings,
    start_logging,
)
from cityops.common.topics import status_topic
from cityops.kinds.startup import load_configured_kinds
from cityops.simulator.city import DEFAULT_PLACE, PLACES, City, Place, build_city
from cityops.simulator.faults import (
    DEFAULT_RATE_LIMIT_BURST,
    FaultSpecError,
    parse_fault_spec,
)
from cityops.simulator.fleet import Fleet, Outbound, Schedule, SimClock
from cityops.simulator.provision import ProvisionError, provision_direct, provision_via_api
from cityops.simulator.publisher import (
    MqttConnectError,
    MqttPublisher,
    PublishStats,
    gateway_client_id,
    pick_connection,
)
from cityops.simulator.settings import SimulatorSettings

log = logging.getLogger("cityops.simulator")

TICK_S = 0.005  # batch everything due within 5 ms: 10 messages per wake-up at 2,000/s
MAX_BATCH = 5000
MAX_DEVICE_CONNECTIONS = 5000
DEVICE_CONNECT_PATIENCE_S = 20.0


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The shape of the city and of the load (from flags)."""

    devices_per_kind: int = 50
    districts: int = 9
    place: Place = PLACES[DEFAULT_PLACE]
    seed: int = 1
    accelerate: float = 1.0
    rate: float | None = None
    duration_s: float | None = None
    mode: str = "gateway"
    connections: int = 1
    faults: tuple[RejectReason, ...] = ()
    fault_interval_s: float = 20.0
    first_fault_s: float = 5.0
    rate_limit_burst: int = DEFAULT_RATE_LIMIT_BURST
    id_prefix: str = ""
    provision: bool = True
    incidents: bool = True
    radio_effects: bool = True
    max_outstanding: int = 1000
    progress_interval_s: float = 10.0
    metrics_port: int | None = None
    settle_s: float = 6.0
    client_id_prefix: str = "cityops-sim"


@dataclass(slots=True)
class RunSummary:
    """What a run did."""

    stats: PublishStats
    fleet_devices: int
    duration_s: float
    by_what: dict[str, int] = field(default_factory=dict)
    drained: bool = True


class SimulatorMetrics:
    """The simulator's Prometheus metrics, in a registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "cityops_simulator_messages_published_total",
            "Messages handed to the MQTT client, by what they are.",
            ["what"],
            registry=registry,
        )
        self.acked = Gauge(
            "cityops_simulator_messages_acked",
            "Messages the broker acknowledged (PUBACK success) in this run.",
            registry=registry,
        )
        self.errors = Gauge(
            "cityops_simulator_publish_errors",
            "Messages refused by the broker or the client in this run.",
            registry=registry,
        )
        self.outstanding = Gauge(
            "cityops_simulator_outstanding_messages",
            "QoS 1 messages sent and not yet acknowledged.",
            registry=registry,
        )


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _centre(text: str) -> tuple[float, float]:
    try:
        lat_text, lon_text = text.split(",")
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected LAT,LON e.g. 41.3874,2.1686") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise argparse.ArgumentTypeError("latitude must be -90..90 and longitude -180..180")
    return lat, lon


def build_parser() -> argparse.ArgumentParser:
    """The `cityops simulate` command line."""
    parser = ServiceParser(prog="cityops simulate", description=__doc__.split("\n")[0])
    city = parser.add_argument_group("city")
    city.add_argument("--devices-per-kind", type=int, default=50)
    city.add_argument("--districts", type=int, default=9)
    city.add_argument(
        "--city",
        choices=sorted(PLACES),
        help=f"a preset city (default: CITYOPS_CITY_LAT/LON/TZ if set, else {DEFAULT_PLACE})",
    )
    city.add_argument("--centre", type=_centre, help="LAT,LON overriding the city's centre")
    city.add_argument("--timezone", help="IANA zone for a custom --centre (e.g. Europe/Paris)")
    city.add_argument("--seed", type=int, default=1)
    city.add_argument("--id-prefix", default="", help="prefix for device ids (e.g. demo-)")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--accelerate", type=_positive_float, default=1.0, help="simulated seconds per second"
    )
    load.add_argument(
        "--rate",
        type=_positive_float,
        help="hold this many messages/s in total (devices in turn) instead of natural intervals",
    )
    load.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    load.add_argument("--mode", choices=("gateway", "device"), default="gateway")
    load.add_argument("--connections", type=int, default=1, help="gateway connections")
    load.add_argument("--max-outstanding", type=int, default=1000, help="unacked QoS 1 bound")
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--faults",
        nargs="?",
        const="all",
        default="none",
        help="inject faults: all (the default when given without a value), none, or a comma "
        "list of A5 reasons",
    )
    behaviour.add_argument("--fault-interval", type=_positive_float, default=20.0)
    behaviour.add_argument("--first-fault", type=float, default=5.0)
    behaviour.add_argument("--rate-limit-burst", type=int, default=DEFAULT_RATE_LIMIT_BURST)
    behaviour.add_argument("--no-incidents", action="store_true", help="no faults at start")
    behaviour.add_argument(
        "--no-radio-effects", action="store_true", help="no dropouts or silent devices"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--no-provision", action="store_true", help="devices already exist")
    run.add_argument("--provision-only", action="store_true", help="provision, then exit")
    run.add_argument("--settle", type=float, default=6.0, help="wait after provisioning (s)")
    run.add_argument("--progress-interval", type=_positive_float, default=10.0)
    run.add_argument("--metrics-port", type=int, help="serve /metrics /healthz /readyz here")
    run.add_argument("--client-id-prefix", default="cityops-sim")
    return parser


def options_from_args(args: argparse.Namespace, settings_place: Place | None = None) -> RunOptions:
    """Validate flags into RunOptions; raises ValueError with a message for the user.

    The city is, in order: --centre, --city, the rules service's CITYOPS_CITY_* settings
    (`settings_place`, so lamp schedules agree), the default preset.
    """
    if args.city is not None:
        place = PLACES[args.city]
    elif settings_place is not None:
        place = settings_place
    else:
        place = PLACES[DEFAULT_PLACE]
    if args.centre is not None:
        lat, lon = args.centre
        place = Place(
            name=f"{lat:.4f},{lon:.4f}",
            lat=lat,
            lon=lon,
            timezone=args.timezone or place.timezone,
            street_bearing_deg=0.0,
        )
    if not 1 <= args.devices_per_kind <= 250_000:
        raise ValueError("--devices-per-kind must be 1..250000")
    if not 1 <= args.districts <= 400:
        raise ValueError("--districts must be 1..400")
    if not 1 <= args.connections <= 64:
        raise ValueError("--connections must be 1..64")
    if args.mode == "device" and args.devices_per_kind * 4 > MAX_DEVICE_CONNECTIONS:
        raise ValueError(
            f"--mode device opens one connection per device; at most {MAX_DEVICE_CONNECTIONS}"
        )
    if len(args.id_prefix) > 40:
        raise ValueError("--id-prefix is at most 40 characters")
    return RunOptions(
        devices_per_kind=args.devices_per_kind,
        districts=args.districts,
        place=place,
        seed=args.seed,
        accelerate=args.accelerate,
        rate=args.rate,
        duration_s=args.duration,
        mode=args.mode,
        connections=args.connections,
        faults=parse_fault_spec(args.faults),
        fault_interval_s=args.fault_interval,
        first_fault_s=max(0.0, args.first_fault),
        rate_limit_burst=max(1, args.rate_limit_burst),
        id_prefix=args.id_prefix,
        provision=not args.no_provision,
        incidents=not args.no_incidents,
        radio_effects=not args.no_radio_effects,
        max_outstanding=args.max_outstanding,
        progress_interval_s=args.progress_interval,
        metrics_port=args.metrics_port,
        settle_s=max(0.0, args.settle),
        client_id_prefix=args.client_id_prefix,
    )


def broker_files(settings: SimulatorSettings) -> BrokerFiles | None:
    """The broker's devices file, when this host has it."""
    return BrokerFiles.from_settings(
        device_file=settings.mqtt_device_password_file,
        lock_file=settings.mqtt_password_lock_file,
    )


async def provision(
    settings: SimulatorSettings, city: City, *, with_credentials: bool
) -> dict[str, str]:
    """Provision through the API when CITYOPS_API_URL is set, else straight into PostgreSQL."""
    key = settings.admin_key()
    if settings.api_url is not None and key is not None:
        done = await provision_via_api(
            api_url=settings.api_url, api_key=key.get_secret_value(), city=city
        )
        missing = [d.device_id for d in city.devices if d.device_id not in done.passwords]
        if with_credentials and missing:
            raise ProvisionError(
                f"{len(missing)} devices already existed, and the API shows passwords only "
                "once: use a fresh --id-prefix for --mode device"
            )
        return done.passwords
    if settings.database_url is not None:
        done = await provision_direct(
            database_url=settings.database_url.get_secret_value(),
            city=city,
            broker_files=broker_files(settings),
            with_credentials=with_credentials,
        )
        return done.passwords
    raise ProvisionError(
        "set CITYOPS_API_URL (+ CITYOPS_API_KEY) or CITYOPS_DATABASE_URL to provision, "
        "or pass --no-provision"
    )


async def _connect_with_retry(publisher: MqttPublisher, *, patience_s: float) -> None:
    """Connect; a refusal is retried for `patience_s` (the broker's auth plugin picks new
    device passwords up within a fraction of a second, longer on a busy machine)."""
    deadline = time.monotonic() + patience_s
    delay = 0.2
    while True:
        try:
            await publisher.connect()
        except MqttConnectError:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
        else:
            return


async def _connect_all(
    publishers: Sequence[MqttPublisher],
    *,
    patience_s: float = 0.0,
) -> None:
    for start in range(0, len(publishers), 200):
        await asyncio.gather(
            *(
                _connect_with_retry(p, patience_s=patience_s)
                for p in publishers[start : start + 200]
            )
        )


class _Runner:
    """The loops of one run: publish what is due, inject faults, report progress."""

    def __init__(
        self,
        *,
        options: RunOptions,
        fleet: Fleet,
        clock: SimClock,
        publishers: list[MqttPublisher],
        metrics: SimulatorMetrics,
        stop: asyncio.Event,
        summary: RunSummary,
        on_message: Callable[[Outbound], None] | None,
    ) -> None:
        self.options = options
        self.fleet = fleet
        self.clock = clock
        self.publishers = publishers
        self.metrics = metrics
        self.stop = stop
        self.summary = summary
        self.on_message = on_message
        self.started = time.monotonic()
        self.live = options.accelerate <= 1
        if options.rate is not None:
            self.schedule = Schedule.at_rate(fleet, rate=options.rate, start_s=0.0)
        else:
            self.schedule = Schedule.natural(fleet, accelerate=options.accelerate, start_s=0.0)

    async def _send(self, index: int, message: Outbound) -> None:
        connection = pick_connection(self.publishers, index)
        if self.options.mode == "device" and message.online is False:
            # a device of its own going silent: it drops off and the broker sends its will
            await connection.go_silent()
            self.summary.by_what["went_silent"] = self.summary.by_what.get("went_silent", 0) + 1
            return
        if self.options.mode == "device" and message.online is True:
            await connection.come_back()
        await connection.publish(message.topic, message.payload)
        what = message.what if message.what in ("telemetry", "status") else "fault"
        self.metrics.published.labels(what).inc()
        by_what = self.summary.by_what
        by_what[message.what] = by_what.get(message.what, 0) + 1
        if self.on_message is not None:
            self.on_message(message)

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds` or until stopped, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)

    async def publish_loop(self) -> None:
        """Publish every device when it is due, and a fault every fault interval."""
        options, fleet, schedule = self.options, self.fleet, self.schedule
        reasons = list(options.faults)
        next_fault, fault_number = options.first_fault_s, 0
        while not self.stop.is_set():
            elapsed = time.monotonic() - self.started
            wake_at = min(schedule.next_due_s(), next_fault) if reasons else schedule.next_due_s()
            if wake_at > elapsed:
                await self._sleep(max(wake_at - elapsed, TICK_S))
                continue
            wall = datetime.now(UTC)
            simulated = self.clock.now(wall)
            if options.rate is None and not self.live and self.clock.caught_up(wall):
                # the replay has reached the present: devices report at their real intervals
                self.live = True
                schedule = self.schedule = Schedule.natural(fleet, accelerate=1.0, start_s=elapsed)
                log.info("simulated clock caught up with the wall clock; running live")
                continue
            for index in schedule.pop_due(elapsed, limit=MAX_BATCH):
                for message in fleet.report(index, simulated):
                    await self._send(index, message)
            if reasons and elapsed >= next_fault:
                reason = reasons[fault_number % len(reasons)]
                fault_number += 1
                next_fault = elapsed + options.fault_interval_s
                for message in fleet.fault(
                    reason,
                    now=simulated,
                    wall_now=wall,
                    ghost_prefix=f"{options.id_prefix}ghost-",
                    burst=options.rate_limit_burst,
                ):
                    await self._send(fleet.index.get(message.device_id, 0), message)

    async def progress_loop(self) -> None:
        """One progress line (and metric update) every progress interval."""
        stats = self.summary.stats
        last_acked, last_at = 0, time.monotonic()
        while not self.stop.is_set():
            await self._sleep(self.options.progress_interval_s)
            now = time.monotonic()
            rate = (stats.acked - last_acked) / max(now - last_at, 1e-9)
            last_acked, last_at = stats.acked, now
            self.metrics.acked.set(stats.acked)
            self.metrics.errors.set(stats.errors)
            self.metrics.outstanding.set(stats.outstanding)
            log.info(
                "progress rate=%.0f/s sent=%d acked=%d errors=%d outstanding=%d",
                rate,
                stats.sent,
                stats.acked,
                stats.errors,
                stats.outstanding,
                extra={
                    "rate_per_s": round(rate, 1),
                    "sent": stats.sent,
                    "acked": stats.acked,
                    "errors": stats.errors,
                    "outstanding": stats.outstanding,
                    "reconnects": stats.reconnects,
                    "lost_over_radio": self.fleet.counters.lost_over_radio,
                },
            )

    async def stop_after_duration(self) -> None:
        """Set `stop` when the run's duration has passed."""
        if self.options.duration_s is not None:
            await self._sleep(self.options.duration_s)
            self.stop.set()

    def readiness(self) -> dict[str, bool]:
        """/readyz: every MQTT connection is up."""
        return {"mqtt": all(p.connected for p in self.publishers)}


async def run(
    settings: SimulatorSettings,
    options: RunOptions,
    *,
    stop: asyncio.Event,
    registry: CollectorRegistry | None = None,
    on_message: Callable[[Outbound], None] | None = None,
) -> RunSummary:
    """Provision, connect, publish until `stop` is set or the duration passes; drain; close."""
    registry = registry if registry is not None else CollectorRegistry()
    city = build_city(
        place=options.place,
        devices_per_kind=options.devices_per_kind,
        district_count=options.districts,
        seed=options.seed,
        id_prefix=options.id_prefix,
    )
    passwords: dict[str, str] = {}
    if options.provision:
        passwords = await provision(settings, city, with_credentials=options.mode == "device")
    wall_start = datetime.now(UTC)
    clock = SimClock.starting(wall_start, accelerate=options.accelerate)
    fleet = Fleet(
        city,
        start=clock.now(wall_start),
        early_incidents=options.incidents,
        radio_effects=options.radio_effects,
    )
    if options.provision and options.settle_s > 0:
        # ingest refreshes its registry cache on a timer (5 s by default)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=options.settle_s)
    stats = PublishStats()
    publishers = _publishers(settings, options, fleet, passwords, stats)
    if passwords:
        await _connect_all(publishers, patience_s=DEVICE_CONNECT_PATIENCE_S)
    else:
        await _connect_all(publishers)
    log.info(
        "simulator connected",
        extra={
            "devices": len(fleet),
            "connections": len(publishers),
            "mode": options.mode,
            "city": options.place.name,
            "accelerate": options.accelerate,
        },
    )
    summary = RunSummary(stats=stats, fleet_devices=len(fleet), duration_s=0.0)
    runner = _Runner(
        options=options,
        fleet=fleet,
        clock=clock,
        publishers=publishers,
        metrics=SimulatorMetrics(registry),
        stop=stop,
        summary=summary,
        on_message=on_message,
    )
    async with contextlib.AsyncExitStack() as stack:
        if options.metrics_port is not None:
            await stack.enter_async_context(
                serve_ops(
                    host="127.0.0.1",
                    port=options.metrics_port,
                    registry=registry,
                    readiness=runner.readiness,
                )
            )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(runner.publish_loop())
                group.create_task(runner.progress_loop())
                group.create_task(runner.stop_after_duration())
        finally:
            summary.duration_s = time.monotonic() - runner.started
            deadline = settings.shutdown_timeout_s
            drained = await asyncio.gather(*(p.flush(timeout=deadline) for p in publishers))
            summary.drained = all(drained)
            await asyncio.gather(*(p.close(timeout=1.0) for p in publishers))
    log.info(
        "simulator stopped: sent=%d acked=%d errors=%d in %.1f s",
        stats.sent,
        stats.acked,
        stats.errors,
        summary.duration_s,
        extra={
            "sent": stats.sent,
            "acked": stats.acked,
            "errors": stats.errors,
            "unacked": stats.outstanding,
            "drained": summary.drained,
            "duration_s": round(summary.duration_s, 2),
            "by_what": summary.by_what,
            "lost_over_radio": fleet.counters.lost_over_radio,
            "devices": summary.fleet_devices,
        },
    )
    return summary


def _publishers(
    settings: SimulatorSettings,
    options: RunOptions,
    fleet: Fleet,
    passwords: dict[str, str],
    stats: PublishStats,
) -> list[MqttPublisher]:
    if options.mode == "gateway":
        password = settings.simulator_mqtt_password
        if password is None:
            raise MqttConnectError("gateway mode needs CITYOPS_SIMULATOR_MQTT_PASSWORD")
        return [
            MqttPublisher(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                client_id=gateway_client_id(f"{options.client_id_prefix}{options.id_prefix}", n),
                username=settings.simulator_mqtt_username,
                password=password.get_secret_value(),
                stats=stats,
                max_outstanding=options.max_outstanding,
            )
            for n in range(options.connections)
        ]
    missing = [r.device.device_id for r in fleet.devices if r.device.device_id not in passwords]
    if missing:
        raise MqttConnectError(
            f"--mode device needs fresh credentials; {len(missing)} devices have none "
            "(do not combine it with --no-provision)"
        )
    per_device = max(1, options.max_outstanding // max(1, len(fleet)))
    return [
        MqttPublisher(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            client_id=runtime.device.device_id,
            username=runtime.device.device_id,
            password=passwords[runtime.device.device_id],
            stats=stats,
            max_outstanding=max(10, per_device),
            will=(status_topic(runtime.device.kind, runtime.device.device_id), b'{"online":false}'),
        )
        for runtime in fleet.devices
    ]


async def _main(settings: SimulatorSettings, options: RunOptions, *, provision_only: bool) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    if provision_only:
        city = build_city(
            place=options.place,
            devices_per_kind=options.devices_per_kind,
            district_count=options.districts,
            seed=options.seed,
            id_prefix=options.id_prefix,
        )
        await provision(settings, city, with_credentials=False)
        return 0
    summary = await run(settings, options, stop=stop)
    return 0 if summary.stats.errors == 0 or options.faults else 1


@entry_point("cityops simulate")
def main(argv: list[str]) -> int:
    """Entry point of `cityops simulate`."""
    args = build_parser().parse_args(argv)
    load_configured_kinds()  # a bad kind file: one line, exit 2
    settings = load_settings(SimulatorSettings)
    try:
        options = options_from_args(args, settings.place())
    except (ValueError, FaultSpecError) as exc:
        raise ConfigError(str(exc)) from None
    start_logging("simulator", settings)
    try:
        return asyncio.run(_main(settings, options, provision_only=args.provision_only))
    except (ProvisionError, MqttConnectError, OSError, PostgresError, httpx.HTTPError) as exc:
        # a dependency that is down or refuses us: say which, no traceback
        log.error("simulator cannot start: %s: %s", exc.__class__.__name__, exc)  # noqa: TRY400
        return 1
