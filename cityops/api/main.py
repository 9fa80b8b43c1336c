"""`cityops api`: the HTTP API (uvicorn) and the read-model projector in one process.

SIGTERM / SIGINT: stop accepting connections, end event streams, let in-flight requests
finish (bounded by CITYOPS_SHUTDOWN_TIMEOUT_S), write and commit the projector's batch in
flight, flush Kafka, close the pool, and log one summary line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator

import asyncpg
import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from cityops.api.app import create_app
from cityops.api.context import ApiContext
from cityops.api.devices import store as store_devices
from cityops.api.devices.credentials import BrokerFiles, CredentialStore
from cityops.api.http.auth import Authenticator, Principal, effective_scopes
from cityops.api.http.cache import TtlCache
from cityops.api.keys import store as store_keys
from cityops.api.keys.usage import KeyUsage, run_key_usage
from cityops.api.metrics import ApiMetrics, create_metrics
from cityops.api.outbox.relay import EventPublisher
from cityops.api.projector.consumer import Projector
from cityops.api.settings import ApiSettings
from cityops.api.stream.broadcaster import Broadcaster
from cityops.common.city_metrics import run_city_metrics
from cityops.common.kafka import KafkaAccess, ensure_topics, kafka_producer
from cityops.common.ops import TaskSupervisor, stop_on_signals
from cityops.common.service import ServiceParser, entry_point, load_settings, start_logging
from cityops.common.setaside import SetAside
from cityops.common.topics import DEADLETTER_TOPIC_CONFIG
from cityops.kinds.startup import load_configured_kinds

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: main() owns SIGTERM and the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Leave signals to the service (uvicorn would re-raise SIGTERM after shutdown)."""
        yield


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: skip asyncpg's default reset round trip on every release.

    The API never leaves session state behind (no LISTEN, no session settings changes, session
    advisory locks are released in `finally`), so the default `RESET ALL; UNLISTEN *; ...` only
    costs a round trip per request.
    """


async def create_pool(settings: ApiSettings) -> asyncpg.Pool:
    """The connection pool; sessions in UTC so partition bounds and date_bin align to UTC."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
        server_settings={
            "timezone": "UTC",
            "application_name": "cityops-api",
            # Prepared statements are reused per connection, and after five runs PostgreSQL
            # may switch to a generic plan that ignores the parameters: for a bbox page that
            # plan was twice as slow. Planning each query costs ~0.25 ms; a bad plan more.
            "plan_cache_mode": "force_custom_plan",
        },
        command_timeout=30,
        reset=_keep_session,
    )
    return pool


async def connect_city_metrics(settings: ApiSettings) -> asyncpg.Connection:
    """The city gauges' dedicated connection: it holds the refresher lock (not a pool's)."""
    conn: asyncpg.Connection = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        server_settings={"timezone": "UTC", "application_name": "cityops-api-city-metrics"},
    )
    return conn


async def start_producer(settings: ApiSettings, stop: asyncio.Event) -> AIOKafkaProducer:
    """An idempotent producer (acks=all), retried until Kafka answers or stop is set."""
    delay = 0.5
    while True:
        producer = kafka_producer(
            KafkaAccess.from_settings(settings),
            client_id=f"cityops-api-{settings.instance_id}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            if stop.is_set():
                raise
            log.warning("kafka not reachable, retrying in %ss: %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)
        else:
            return producer


class Readiness:
    """/readyz checks: PostgreSQL answers, Kafka metadata can be fetched (cached for 1 s), and
    every watched consumer or task is healthy (`watch`, not cached)."""

    def __init__(self, *, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self._pool = pool
        self._producer = producer
        self._cached: tuple[float, dict[str, bool]] | None = None
        self._watched: dict[str, Callable[[], bool]] = {}

    def watch(self, name: str, healthy: Callable[[], bool]) -> None:
        """Report `healthy()` as check `name` (a consumer or the service's tasks)."""
        self._watched[name] = healthy

    async def __call__(self) -> dict[str, bool]:
        """The dependency checks."""
        watched = {name: healthy() for name, healthy in self._watched.items()}
        return {**await self._dependencies(), **watched}

    async def _dependencies(self) -> dict[str, bool]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < 1.0:
            return self._cached[1]
        checks = {"database": False, "kafka": False}
        db_errors = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
        with contextlib.suppress(*db_errors):
            checks["database"] = await asyncio.wait_for(self._pool.fetchval("SELECT 1"), 2) == 1
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 2)
            checks["kafka"] = True
        except (TimeoutError, KafkaError, OSError):
            pass
        self._cached = (now, checks)
        return checks


def build_context(
    settings: ApiSettings,
    *,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    metrics: ApiMetrics,
    key_usage: KeyUsage | None = None,
    readiness: Readiness | None = None,
) -> ApiContext:
    """Wire the collaborators of the HTTP app."""

    async def lookup(key_hash: bytes) -> Principal | None:
        row = await store_keys.find_key(pool, key_hash=key_hash)
        return None if row is None else Principal(row["name"], effective_scopes(row["scopes"]))

    bootstrap = settings.api_bootstrap_key
    files = BrokerFiles.from_settings(
        device_file=settings.mqtt_device_password_file, lock_file=settings.mqtt_password_lock_file
    )
    return ApiContext(
        settings=settings,
        pool=pool,
        metrics=metrics,
        authenticator=Authenticator(
            lookup=lookup,
            bootstrap_key=bootstrap.get_secret_value() if bootstrap else None,
            cache_s=settings.api_key_cache_s,
            on_use=key_usage.record if key_usage is not None else None,
        ),
        credentials=CredentialStore(
            files=files, metrics=metrics, iterations=settings.mqtt_password_iterations
        ),
        publisher=EventPublisher(
            producer=producer,
            pool=pool,
            metrics=metrics,
            devices_topic=settings.topic_devices,
            tickets_topic=settings.topic_tickets,
            publish_timeout_s=settings.api_outbox_publish_timeout_s,
            sweep_interval_s=settings.api_outbox_sweep_s,
        ),
        broadcaster=Broadcaster(
            access=KafkaAccess.from_settings(settings),
            topics={
                "telemetry": settings.topic_telemetry,
                "status": settings.topic_status,
                "tickets": settings.topic_tickets,
                "devices": settings.topic_devices,
            },
            pool=pool,
            metrics=metrics,
            queue_max=settings.api_stream_queue_max,
            fetch_max_wait_ms=settings.api_stream_fetch_max_wait_ms,
            resume_max=settings.api_stream_resume_max,
            resume_max_events=settings.api_stream_resume_max_events,
        ),
        readiness=readiness if readiness is not None else Readiness(pool=pool, producer=producer),
        summaries=TtlCache(ttl_s=settings.api_summary_cache_s),
    )


def build_projector(
    settings: ApiSettings, *, pool: asyncpg.Pool, producer: AIOKafkaProducer, metrics: ApiMetrics
) -> Projector:
    """The read-model projector for these settings; it sets records aside with `producer`."""
    return Projector(
        set_aside=SetAside(
            producer=producer,
            topic=settings.topic_deadletter,
            consumer=settings.api_projector_group,
            counter=metrics.projector_set_aside,
        ),
        stall_s=settings.api_projector_stall_s,
        pool=pool,
        access=KafkaAccess.from_settings(settings),
        topics=[settings.topic_telemetry, settings.topic_status],
        telemetry_topic=settings.topic_telemetry,
        group_id=settings.api_projector_group,
        metrics=metrics,
        batch_max=settings.api_projector_batch_max,
        fetch_timeout_ms=settings.api_projector_fetch_timeout_ms,
        partitions_ahead_days=settings.api_partitions_ahead_days,
        retention_days=settings.retention_days(),
        maintenance_interval_s=settings.api_maintenance_interval_s,
        client_id=f"cityops-api-{settings.instance_id}",
        write_lanes=settings.api_projector_write_lanes,
        commit_interval_s=settings.api_projector_commit_interval_ms / 1000,
    )


@contextlib.asynccontextmanager
async def running_service(
    settings: ApiSettings,
    stop: asyncio.Event,
    registry: CollectorRegistry,
    supervisor: TaskSupervisor | None = None,
) -> AsyncIterator[tuple[_Server, ApiContext]]:
    """Start pool, producer, projector and HTTP server; tear them down in order on exit.

    The projector and the outbox relay are watched by `supervisor`: if either ends on its own,
    /readyz turns red and `stop` is set (serve() then exits non-zero).
    """
    supervisor = supervisor if supervisor is not None else TaskSupervisor(stop)
    metrics = create_metrics(registry)
    await ensure_topics(
        KafkaAccess.from_settings(settings),
        topics=dict.fromkeys(
            (
                settings.topic_telemetry,
                settings.topic_status,
                settings.topic_tickets,
                settings.topic_devices,
                settings.topic_deadletter,
            ),
            settings.topic_partitions,
        ),
        compacted={settings.topic_devices},
        configs={settings.topic_deadletter: DEADLETTER_TOPIC_CONFIG},
    )
    pool = await create_pool(settings)
    producer = await start_producer(settings, stop)
    key_usage = KeyUsage(registry=registry, flush_s=settings.api_key_usage_flush_s)
    readiness = Readiness(pool=pool, producer=producer)
    readiness.watch("tasks", supervisor.healthy)
    context = build_context(
        settings,
        pool=pool,
        producer=producer,
        metrics=metrics,
        key_usage=key_usage,
        readiness=readiness,
    )
    projector_task: asyncio.Task[None] | None = None
    projector = None
    # the outbox relay: publishes committed events, sweeps what failures and crashes left
    relay_task = supervisor.watch(
        asyncio.create_task(context.publisher.run(stop), name="outbox-relay")
    )
    try:
        async with pool.acquire() as conn:
            states = await store_devices.credential_states(conn)
            if states:
                await context.credentials.reconcile(conn, states)
        if settings.api_projector_enabled:
            projector = build_projector(settings, pool=pool, producer=producer, metrics=metrics)
            readiness.watch("projector", projector.healthy)
            projector_task = supervisor.watch(
                asyncio.create_task(projector.run(stop), name="projector")
            )
        config = uvicorn.Config(
            create_app(context, registry=registry),
            host=settings.api_host,
            port=settings.api_port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
            server_header=False,
        )
        server = _Server(config)
        # city-domain gauges (cityops_city_*), refreshed from PostgreSQL on a timer by the one
        # replica that holds the refresher lock
        # keys' last_used_at: flushed on a timer, and once more after the server has stopped
        async with (
            run_city_metrics(
                functools.partial(connect_city_metrics, settings),
                registry=registry,
                interval_s=settings.city_metrics_interval_s,
                timeout_s=settings.city_metrics_timeout_s,
            ),
            run_key_usage(pool, key_usage),
        ):
            yield server, context
    finally:
        stop.set()
        await context.broadcaster.close()
        if projector_task is not None:
            try:
                await asyncio.wait_for(projector_task, settings.shutdown_timeout_s)
            except TimeoutError:
                log.exception("projector did not stop in time; its batch will be replayed")
            except Exception:
                log.debug("projector ended with an error", exc_info=True)
        await _stop_relay(context, relay_task, timeout_s=settings.shutdown_timeout_s)
        await producer.stop()
        await pool.close()


async def _stop_relay(context: ApiContext, task: asyncio.Task[None], *, timeout_s: float) -> None:
    """Wait for the relay loop, then publish what the last requests committed (bounded)."""
    try:
        await asyncio.wait_for(task, timeout_s)
        await asyncio.wait_for(context.publisher.final_relay(), timeout_s)
    except TimeoutError:
        log.warning("outbox relay did not finish in time; the outbox keeps the events")
    except Exception:
        # a bug in the relay must not skip the rest of the shutdown; the outbox keeps the events
        log.exception("outbox relay failed")


def freeze_startup_heap() -> int:
    """Move every object alive after start-up out of the garbage collector's reach.

    The modules, app, routes, pydantic models and pool built at start-up live as long as the
    process, yet every full collection walked all of them: measured at 100k devices and 200
    requests/s, a full collection every ~10 s paused the event loop for 36-86 ms (nothing
    collected), and each pause queued ~10-20 requests behind it, which was the p99 of the list
    and bbox pages. After the freeze a full collection takes ~0.3 ms. Returns the number of
    objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve(settings: ApiSettings) -> int:
    """Run until SIGTERM / SIGINT; returns the exit code."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    registry = CollectorRegistry()
    supervisor = TaskSupervisor(stop)
    started = time.monotonic()
    async with running_service(settings, stop, registry, supervisor) as (server, context):

        async def stop_server() -> None:
            await stop.wait()
            await context.broadcaster.close()  # streams end, so connections can close
            server.should_exit = True

        watcher = asyncio.create_task(stop_server(), name="stop-watcher")
        log.info("start-up heap frozen", extra={"objects": freeze_startup_heap()})
        try:
            await server.serve()
        finally:
            watcher.cancel()
    requests = sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "cityops_api_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    log.info(
        "api stopped",
        extra={
            "uptime_s": round(time.monotonic() - started, 1),
            "requests": int(requests),
            "failed_tasks": supervisor.failed,
        },
    )
    return supervisor.exit_code


@entry_point("cityops api")
def main(argv: list[str]) -> int:
    """`cityops api`: serve the HTTP API and run the projector."""
    parser = ServiceParser(prog="cityops api", description=__doc__)
    parser.parse_args(argv)
    load_configured_kinds()  # a bad kind file: one line, exit 2
    settings = load_settings(ApiSettings)
    start_logging("api", settings)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
