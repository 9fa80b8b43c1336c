"""`cityops ingest`: MQTT -> validate -> Kafka, acknowledging each message only once Kafka has it.

Lifecycle: take positions at the end of the devices topic, load the device registry, connect the
Kafka producer, then connect to MQTT and start reading. SIGTERM/SIGINT stops reading, finishes
what was received (bounded by CITYOPS_SHUTDOWN_TIMEOUT_S), sends the remaining PUBACKs,
disconnects, and logs one summary line.

`cityops ingest --purge-session` instead ends the replica's persistent MQTT session at the broker
and exits: for a replica removed for good, whose session would otherwise keep receiving its share
of the readings (docs/ingest.md, "Scaling down").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from cityops.common.kafka import KafkaAccess, ensure_topics
from cityops.common.mqtt_sessions import purge_session
from cityops.common.ops import serve_ops, stop_on_signals
from cityops.common.service import ServiceParser, entry_point, load_settings, start_logging
from cityops.common.topics import DEADLETTER_TOPIC_CONFIG
from cityops.ingest.deadletters import RejectBudget
from cityops.ingest.kafka_sink import KafkaSink
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.mqtt_source import MqttSource
from cityops.ingest.pipeline import Pipeline, PipelineStats
from cityops.ingest.ratelimit import TokenBuckets
from cityops.ingest.registry_cache import RegistryCache, keep_fresh
from cityops.ingest.registry_follow import DevicesFollower
from cityops.ingest.registry_lookup import DatabaseLookup, MissResolver
from cityops.ingest.settings import IngestSettings
from cityops.ingest.validate import OutputTopics, Validator
from cityops.kinds.startup import load_configured_kinds

log = logging.getLogger(__name__)

# At start-up the snapshot waits this long for the devices-topic follower to take its positions
# (see registry_follow); without the topic it loads anyway, refresh and lookups still work.
_FOLLOW_WAIT_S = 10.0
_MAX_CLIENT_ID = 128  # as CITYOPS_INGEST_CLIENT_ID


async def run(settings: IngestSettings, *, stop: asyncio.Event | None = None) -> PipelineStats:
    """Run the service until `stop` is set (or SIGTERM/SIGINT when `stop` is not given)."""
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop)
    started = time.monotonic()
    registry = CollectorRegistry()
    metrics = IngestMetrics.create(registry)
    cache = RegistryCache()
    topics = OutputTopics(
        telemetry=settings.topic_telemetry,
        status=settings.topic_status,
        deadletter=settings.topic_deadletter,
    )
    validator = Validator(
        registry=cache,
        telemetry_limiter=TokenBuckets(
            rate_per_s=settings.ingest_rate_per_s, burst=settings.ingest_rate_burst
        ),
        status_limiter=TokenBuckets(
            rate_per_s=settings.ingest_rate_per_s, burst=settings.ingest_rate_burst
        ),
        ingest_id=settings.instance_id,
        topics=topics,
        max_payload_bytes=settings.ingest_max_payload_bytes,
        clock_skew_s=settings.ingest_clock_skew_s,
    )
    sink = KafkaSink(
        access=KafkaAccess.from_settings(settings),
        client_id=f"ingest-{settings.instance_id}",
        compression=settings.ingest_kafka_compression,
        max_batch_bytes=settings.ingest_kafka_max_batch_bytes,
        request_timeout_ms=settings.ingest_kafka_request_timeout_ms,
    )
    database_url = settings.database_url.get_secret_value()
    lookup = DatabaseLookup(database_url=database_url)
    resolver = (
        MissResolver(
            cache=cache,
            fetch=lookup,
            metrics=metrics,
            max_ids=settings.ingest_registry_lookup_max_ids,
            absent_ttl_s=settings.ingest_registry_refresh_s,
            timeout_s=settings.ingest_registry_lookup_timeout_s,
        )
        if settings.ingest_registry_lookup_max_ids > 0
        else None
    )
    follower = DevicesFollower(
        access=KafkaAccess.from_settings(settings),
        topic=settings.topic_devices,
        client_id=f"ingest-registry-{settings.instance_id}",
        cache=cache,
        metrics=metrics,
    )
    pipeline = Pipeline(
        validator=validator,
        sink=sink,
        metrics=metrics,
        ingest_id=settings.instance_id,
        max_in_flight=settings.ingest_max_in_flight,
        resolver=resolver,
        reject_budget=RejectBudget(
            rate_per_s=settings.ingest_deadletter_rate_per_s,
            burst=settings.ingest_deadletter_burst,
        ),
        deadletter_prefix_bytes=settings.ingest_deadletter_prefix_bytes,
        summary_interval_s=settings.ingest_deadletter_summary_s,
    )

    def on_connection_change(connected: bool) -> None:
        metrics.mqtt_connected.set(1 if connected else 0)
        if not connected:
            metrics.mqtt_reconnects.inc()

    source = MqttSource(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        username=settings.ingest_mqtt_username,
        password=settings.ingest_mqtt_password.get_secret_value(),
        client_id=settings.ingest_client_id,
        share_group=settings.ingest_share_group,
        protocol=settings.ingest_mqtt_protocol,
        receive_maximum=settings.ingest_max_in_flight,
        session_expiry_s=settings.ingest_session_expiry_s,
        keepalive_s=settings.ingest_keepalive_s,
        on_messages=pipeline.submit,
        on_connection_change=on_connection_change,
    )
    pipeline.bind(source)

    def readiness() -> Mapping[str, bool]:
        metrics.registry_devices.set(len(cache))
        return {
            "registry": cache.loaded.is_set(),
            "kafka": sink.started and pipeline.oldest_pending_age() < settings.ingest_kafka_stall_s,
            "mqtt": source.subscribed,
        }

    async with (
        serve_ops(
            host=settings.metrics_host,
            port=settings.metrics_port,
            registry=registry,
            readiness=readiness,
        ),
        asyncio.TaskGroup() as tasks,
    ):
        tasks.create_task(follower.run(stop))
        # Positions first, snapshot second: a change committed after the snapshot is then
        # certainly read from the topic (registry_follow explains why).
        await _first(follower.positioned, stop, timeout_s=_FOLLOW_WAIT_S)
        tasks.create_task(
            keep_fresh(
                cache,
                database_url=database_url,
                refresh_s=settings.ingest_registry_refresh_s,
                full_reload_s=settings.ingest_registry_full_reload_s,
                stop=stop,
            )
        )
        # Reading before the registry is loaded would dead-letter every device as unknown.
        if await _first(cache.loaded, stop) and await sink.start(stop):
            await _ensure_output_topics(settings, topics)
            pipeline_task = tasks.create_task(pipeline.run())
            source_task = tasks.create_task(source.run(stop))
            log.info(
                "ingest running",
                extra={
                    "client_id": settings.ingest_client_id,
                    "share_group": settings.ingest_share_group,
                    "protocol": settings.ingest_mqtt_protocol,
                    "devices": len(cache),
                },
            )
            await stop.wait()
            source.pause()
            drained = await pipeline.close(within_s=settings.shutdown_timeout_s)
            await source.close()
            await source_task
            if not drained:
                pipeline_task.cancel()
            await sink.stop()
        else:
            drained = True
        stop.set()
        await lookup.close()
    stats = pipeline.stats
    log.info(
        "ingest stopped",
        extra={
            "received": stats.received,
            "accepted": stats.accepted,
            "rejected": stats.rejected,
            "acked": stats.acked,
            "delivery_failures": stats.delivery_failures,
            "drained": drained,
            "uptime_s": round(time.monotonic() - started, 1),
        },
    )
    return stats


async def _first(
    ready: asyncio.Event, stop: asyncio.Event, *, timeout_s: float | None = None
) -> bool:
    """Wait for `ready` or `stop` (or the timeout); True if `ready` came first."""
    waiters = {asyncio.ensure_future(ready.wait()), asyncio.ensure_future(stop.wait())}
    await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    return ready.is_set() and not stop.is_set()


async def _ensure_output_topics(settings: IngestSettings, topics: OutputTopics) -> None:
    """Create the output topics if missing (a no-op when deployment created them)."""
    with contextlib.suppress(Exception):  # best effort: the producer's metadata wait reports it
        await ensure_topics(
            KafkaAccess.from_settings(settings),
            topics=dict.fromkeys(
                (topics.telemetry, topics.status, topics.deadletter), settings.topic_partitions
            ),
            configs={topics.deadletter: DEADLETTER_TOPIC_CONFIG},
        )


def end_session(settings: IngestSettings, *, client_id: str) -> int:
    """End the persistent MQTT session of `client_id`; the exit code (0: the broker took it)."""
    context = {"client_id": client_id, "broker": f"{settings.mqtt_host}:{settings.mqtt_port}"}
    ended = purge_session(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        username=settings.ingest_mqtt_username,
        password=settings.ingest_mqtt_password.get_secret_value(),
        client_id=client_id,
    )
    if not ended:
        log.error(
            "could not end the MQTT session of %s: the broker refused the ingest account or did "
            "not answer (reason logged above); the session, if any, is still there",
            client_id,
            extra=context,
        )
        return 1
    # A clean-session CONNECT answers "no session present" whether or not one existed.
    log.info(
        "ended the MQTT session of %s (if it existed) and the readings queued for it",
        client_id,
        extra=context,
    )
    return 0


def _client_id(value: str) -> str:
    if not 1 <= len(value) <= _MAX_CLIENT_ID:
        raise argparse.ArgumentTypeError(f"expected 1 to {_MAX_CLIENT_ID} characters")
    return value


@entry_point("cityops ingest")
def main(argv: list[str]) -> int:
    """Entry point of `cityops ingest`."""
    parser = ServiceParser(
        prog="cityops ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--purge-session",
        action="store_true",
        help="end this replica's persistent MQTT session at the broker and exit, DROPPING the "
        "readings still queued for it; only for a replica stopped for good, once the remaining "
        "replicas run (docs/ingest.md, 'Scaling down')",
    )
    parser.add_argument(
        "--client-id",
        type=_client_id,
        metavar="ID",
        help="with --purge-session: the session to end (default: this replica's own, "
        "CITYOPS_INGEST_CLIENT_ID or ingest-<host name>-<CITYOPS_INGEST_REPLICA_INDEX>)",
    )
    args = parser.parse_args(argv)
    load_configured_kinds()  # a bad kind file: one line, exit 2
    if args.client_id is not None and not args.purge_session:
        parser.error("--client-id only goes with --purge-session")
    settings = load_settings(IngestSettings)
    start_logging("ingest", settings)
    if args.purge_session:
        return end_session(settings, client_id=args.client_id or settings.ingest_client_id)
    asyncio.run(run(settings))
    return 0
