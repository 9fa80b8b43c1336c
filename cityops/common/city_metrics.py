"""City-domain gauges for Prometheus, computed from PostgreSQL on a timer, never per scrape.

What a city manager watches, per district (and kind): devices online/offline, lamps out, bins
at least 90 % full, parking occupancy, open and overdue tickets by priority and department.

One SQL statement per refresh reads the `ops` views (migration 0300) and the result is cached;
a scrape only renders the cached snapshot, so its cost is independent of the scrape rate and of
how many Prometheus servers scrape. A snapshot older than `max_age_s` is no longer served (the
series vanish rather than lie), and `cityops_city_refresh_timestamp_seconds` lets an alert see it.

One replica at a time is the refresher: the one whose dedicated connection holds the
session-level advisory lock `REFRESHER_LOCK` (`pg_try_advisory_lock`, tried on every tick by
the others). Only the refresher runs the query and exports the city gauges, so a sum over
replicas is the city's value and the database runs the query once per interval, not once per
replica. If the refresher dies or its connection breaks, PostgreSQL ends the session and
releases the lock, and another replica takes over on its next tick; a replica whose connection
closed stops exporting at once (the session, and with it the lock, is gone).
`cityops_city_refresher` (1/0) says which replica it is.

Wiring, in a service (`connect` opens the dedicated connection):

    async with run_city_metrics(
        connect, registry=registry, interval_s=settings.city_metrics_interval_s
    ) as city_metrics:
        ...  # serve
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field

from cityops.common.settings import BaseServiceSettings

log = logging.getLogger(__name__)

# pg_try_advisory_lock key (session level): its holder is the replica that refreshes the gauges.
REFRESHER_LOCK = 0x6369747900C1

Connect = Callable[[], Awaitable[asyncpg.Connection]]

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class CityMetricsSettings(BaseServiceSettings):
    """How often the city gauges are recomputed (a mixin for the service that serves them)."""

    city_metrics_interval_s: float = Field(default=15.0, ge=1.0, le=3600.0)
    city_metrics_timeout_s: float = Field(default=10.0, gt=0, le=300.0)


@dataclass(frozen=True, slots=True)
class CityRow:
    """One aggregate from the refresh query; unused label columns are empty strings."""

    metric: str
    district: str
    kind: str
    connectivity: str
    priority: str
    department: str
    value: float


@dataclass(frozen=True, slots=True)
class CitySnapshot:
    """The cached result of one refresh."""

    rows: tuple[CityRow, ...]
    taken_at: float  # unix time
    duration_s: float


# One statement: `ops.devices` is materialised once and aggregated five ways; tickets are read
# once. Zero rows are emitted for every district that has devices of the kind, so ratios and
# alerts see 0 rather than "no data". Tickets: every (district, kind, priority, department)
# seen in the last 30 days gets a series, and every (district, kind) with devices gets a zero
# per priority without a department (an empty label is no label), so "no open P1" is a 0.
REFRESH_SQL = """
WITH d AS MATERIALIZED (
    SELECT district, kind, connectivity, lamp_out, bin_full, occupied FROM ops.devices
), t AS MATERIALIZED (
    SELECT district, kind, priority, department, unresolved, overdue
    FROM ops.tickets
    WHERE unresolved OR opened_at > now() - interval '30 days'
)
SELECT 'devices' AS metric, district, kind, connectivity, '' AS priority, '' AS department,
       count(*)::float8 AS value
FROM d GROUP BY district, kind, connectivity
UNION ALL
SELECT 'lamps_out', district, kind, '', '', '', count(*) FILTER (WHERE lamp_out)
FROM d WHERE kind = 'streetlight' GROUP BY district, kind
UNION ALL
SELECT 'bins_full', district, kind, '', '', '', count(*) FILTER (WHERE bin_full)
FROM d WHERE kind = 'wastebin' GROUP BY district, kind
UNION ALL
SELECT 'parking_occupied', district, kind, '', '', '', count(*) FILTER (WHERE occupied)
FROM d WHERE kind = 'parking' GROUP BY district, kind
UNION ALL
SELECT 'parking_reporting', district, kind, '', '', '', count(occupied)
FROM d WHERE kind = 'parking' GROUP BY district, kind
UNION ALL
SELECT 'tickets_open', district, kind, '', priority, department,
       count(*) FILTER (WHERE unresolved)
FROM t GROUP BY district, kind, priority, department
UNION ALL
SELECT 'tickets_overdue', district, kind, '', priority, department,
       count(*) FILTER (WHERE overdue)
FROM t GROUP BY district, kind, priority, department
UNION ALL
SELECT m.metric, k.district, k.kind, '', p.priority, '', 0
FROM (SELECT DISTINCT district, kind FROM d) AS k
CROSS JOIN (VALUES ('P1'), ('P2'), ('P3'), ('P4')) AS p (priority)
CROSS JOIN (VALUES ('tickets_open'), ('tickets_overdue')) AS m (metric)
"""

# metric key -> (metric name, help, label names): label values come from CityRow fields.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "devices": (
        "cityops_city_devices",
        "Registered, enabled devices by connectivity (online, offline, never_seen).",
        ("district", "kind", "connectivity"),
    ),
    "lamps_out": (
        "cityops_city_lamps_out",
        "Street lights out: reporting a fault or holding an open lamp_out/lamp_fault ticket.",
        ("district",),
    ),
    "bins_full": (
        "cityops_city_bins_full",
        "Waste bins whose latest fill level is at least 90 %.",
        ("district",),
    ),
    "parking_occupied": (
        "cityops_city_parking_occupied",
        "Parking spots whose latest reading says occupied.",
        ("district",),
    ),
    "parking_reporting": (
        "cityops_city_parking_reporting",
        "Parking spots with a known occupancy (the occupancy ratio's denominator).",
        ("district",),
    ),
    "tickets_open": (
        "cityops_city_tickets_open",
        "Unresolved tickets (open, acknowledged, in progress).",
        ("district", "kind", "priority", "department"),
    ),
    "tickets_overdue": (
        "cityops_city_tickets_overdue",
        "Unresolved tickets past their due time (SLA breached).",
        ("district", "kind", "priority", "department"),
    ),
}


def row_from_record(record: asyncpg.Record) -> CityRow:
    """A query row as a CityRow."""
    return CityRow(
        metric=record["metric"],
        district=record["district"],
        kind=record["kind"],
        connectivity=record["connectivity"],
        priority=record["priority"],
        department=record["department"],
        value=float(record["value"]),
    )


def domain_families(rows: Iterable[CityRow]) -> list[GaugeMetricFamily]:
    """Gauge families for the snapshot's rows (every family, even when it has no samples)."""
    families = {
        key: GaugeMetricFamily(name, documentation, labels=list(labels))
        for key, (name, documentation, labels) in FAMILIES.items()
    }
    for row in rows:
        spec = FAMILIES.get(row.metric)
        if spec is None:
            continue
        families[row.metric].add_metric([getattr(row, label) for label in spec[2]], row.value)
    return list(families.values())


class CityMetrics(Collector):
    """A prometheus_client collector serving the last snapshot; `refresh()` replaces it."""

    def __init__(
        self,
        *,
        interval_s: float = 15.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        # older than this, the snapshot is withheld: three missed refreshes
        self.max_age_s = 3 * interval_s + timeout_s
        self._clock = clock
        self._snapshot: CitySnapshot | None = None
        self._errors = 0
        # the dedicated session holding REFRESHER_LOCK while this replica is the refresher
        self._session: asyncpg.Connection | None = None
        # this replica's dedicated connection, kept open whether or not it holds the lock
        self._standby: asyncpg.Connection | None = None

    @property
    def snapshot(self) -> CitySnapshot | None:
        """The last successful refresh, if any."""
        return self._snapshot

    def fresh(self) -> bool:
        """Whether a snapshot exists and is young enough to serve (a readiness check)."""
        return self._snapshot is not None and (
            self._clock() - self._snapshot.taken_at <= self.max_age_s
        )

    def is_refresher(self) -> bool:
        """Whether this replica holds the refresher lock (its session is still open)."""
        return self._session is not None and not self._session.is_closed()

    def lead(self, session: asyncpg.Connection) -> None:
        """Become the refresher: `session` holds REFRESHER_LOCK."""
        self._session = session

    def resign(self) -> None:
        """Stop being the refresher: forget the session and withhold the gauges at once."""
        self._session = None
        self._snapshot = None

    async def tick(self, connect: Connect) -> None:
        """One timer tick: (re)connect, try to become the refresher, refresh if it is.

        Raises what connecting or the database raised; the caller counts and logs it.
        """
        session = self._session
        if session is not None and session.is_closed():
            log.warning("city metrics refresher session closed; no longer the refresher")
            self.resign()
            session = None
        if session is None:
            if self._standby is None or self._standby.is_closed():
                self._standby = await asyncio.wait_for(connect(), timeout=self.timeout_s)
            locked = await self._standby.fetchval(
                "SELECT pg_try_advisory_lock($1)", REFRESHER_LOCK, timeout=self.timeout_s
            )
            if not locked:
                return
            session = self._standby
            self.lead(session)
            log.info("became the city metrics refresher")
        await self.refresh(session)

    async def close(self) -> None:
        """Resign and close the dedicated connection (PostgreSQL releases the lock)."""
        standby, self._standby = self._standby, None
        self.resign()
        if standby is not None and not standby.is_closed():
            try:
                await standby.close(timeout=self.timeout_s)
            except _DB_ERRORS as exc:
                log.warning("city metrics connection did not close cleanly: %s", exc)
                standby.terminate()

    def store(self, rows: Sequence[CityRow], *, taken_at: float, duration_s: float) -> None:
        """Replace the snapshot."""
        self._snapshot = CitySnapshot(tuple(rows), taken_at, duration_s)

    def record_error(self) -> None:
        """Count a failed refresh."""
        self._errors += 1

    async def refresh(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        """Run the one query and cache its result; raises what the database raised."""
        started = time.perf_counter()
        records = await pool.fetch(REFRESH_SQL, timeout=self.timeout_s)
        self.store(
            [row_from_record(record) for record in records],
            taken_at=self._clock(),
            duration_s=time.perf_counter() - started,
        )

    def describe(self) -> Iterable[Metric]:
        """Families without samples, so registering never runs a query."""
        yield from domain_families(())
        yield from self._meta_families()

    def collect(self) -> Iterable[Metric]:
        """The refresher's fresh snapshot as gauges (else none), plus refresh health."""
        snapshot = self._snapshot if self.is_refresher() and self.fresh() else None
        yield from domain_families(snapshot.rows if snapshot else ())
        yield from self._meta_families()

    def _meta_families(self) -> Iterable[Metric]:
        taken = GaugeMetricFamily(
            "cityops_city_refresh_timestamp_seconds",
            "Unix time of the last successful refresh of the city gauges (0: none yet).",
        )
        duration = GaugeMetricFamily(
            "cityops_city_refresh_duration_seconds",
            "How long the last successful refresh query took.",
        )
        errors = CounterMetricFamily(
            "cityops_city_refresh_errors",
            "Ticks of the city gauges refresher that failed (connecting, locking or the query).",
        )
        refresher = GaugeMetricFamily(
            "cityops_city_refresher",
            "1 if this replica is the one that refreshes and exports the city gauges, else 0.",
        )
        # only the refresher has a refresh time: max over replicas is the city gauges' age
        if self.is_refresher():
            snapshot = self._snapshot
            taken.add_metric([], snapshot.taken_at if snapshot else 0.0)
            duration.add_metric([], snapshot.duration_s if snapshot else 0.0)
        errors.add_metric([], float(self._errors))
        refresher.add_metric([], 1.0 if self.is_refresher() else 0.0)
        return (taken, duration, errors, refresher)


async def refresh_forever(
    metrics: CityMetrics, connect: Connect, *, stop: asyncio.Event | None = None
) -> None:
    """Tick every `interval_s` until `stop` is set (or the task is cancelled), then resign."""
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            try:
                await metrics.tick(connect)
            except _DB_ERRORS as exc:
                metrics.record_error()
                log.warning(
                    "city metrics refresh failed: %s", exc, extra={"error": type(exc).__name__}
                )
            else:
                snapshot = metrics.snapshot if metrics.is_refresher() else None
                log.debug(
                    "city metrics tick",
                    extra={
                        "refresher": metrics.is_refresher(),
                        "rows": len(snapshot.rows) if snapshot else 0,
                        "duration_s": snapshot.duration_s if snapshot else 0,
                    },
                )
            # a timer, not a poll: wake at the next refresh time or as soon as stop is set
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=metrics.interval_s)
    finally:
        await metrics.close()


@contextlib.asynccontextmanager
async def run_city_metrics(
    connect: Connect,
    *,
    registry: CollectorRegistry,
    interval_s: float = 15.0,
    timeout_s: float = 10.0,
) -> AsyncIterator[CityMetrics]:
    """Register the collector in `registry` and refresh it in the background until exit.

    `connect` opens this replica's dedicated connection (not a pool's: it holds a
    session-level lock for as long as the replica is the refresher).
    """
    metrics = CityMetrics(interval_s=interval_s, timeout_s=timeout_s)
    registry.register(metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(refresh_forever(metrics, connect, stop=stop), name="city-metrics")
    try:
        yield metrics
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=2 * timeout_s + 1)
        except TimeoutError:
            log.warning("city metrics refresh did not stop in time; cancelled")
        registry.unregister(metrics)
