"""`cityops rules`: the rules / ticketing service.

Reads `city.telemetry.v1` and `city.status.v1` as consumer group CITYOPS_RULES_GROUP, keeps
tickets in PostgreSQL and publishes every transition to `city.tickets.v1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import asyncpg
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry

from cityops.common.kafka import (
    KafkaAccess,
    ensure_topics,
    kafka_admin,
    kafka_consumer,
    kafka_producer,
)
from cityops.common.ops import serve_ops, stop_on_signals
from cityops.common.service import (
    ConfigError,
    ServiceParser,
    entry_point,
    load_settings,
    start_logging,
)
from cityops.common.setaside import SetAside
from cityops.kinds.startup import load_configured_kinds
from cityops.rules.config import RuleFileError, RuleSet, load_rules
from cityops.rules.consumer import RulesWorker
from cityops.rules.metrics import create_metrics
from cityops.rules.publisher import TicketPublisher
from cityops.rules.settings import RulesSettings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start with this configuration."""


async def _check_copartitioned(settings: RulesSettings) -> None:
    # A device's readings and status must land on one replica: the range assignor gives
    # partition n of both topics to the same member only when the counts match.
    admin = kafka_admin(KafkaAccess.from_settings(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([settings.topic_telemetry, settings.topic_status])
    finally:
        await admin.close()
    counts = {t["topic"]: len(t.get("partitions") or ()) for t in described}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise StartupError(f"telemetry and status topics need equal partition counts: {counts}")


async def run(
    settings: RulesSettings,
    ruleset: RuleSet,
    *,
    stop: asyncio.Event,
    registry: CollectorRegistry | None = None,
    ready: asyncio.Event | None = None,
) -> int:
    """Run until `stop` is set; returns the process exit code."""
    registry = registry or CollectorRegistry()
    metrics = create_metrics(registry)
    started = time.monotonic()
    access = KafkaAccess.from_settings(settings)
    await ensure_topics(
        access,
        topics=dict.fromkeys(
            (
                settings.topic_telemetry,
                settings.topic_status,
                settings.topic_tickets,
                settings.topic_deadletter,
            ),
            settings.topic_partitions,
        ),
    )
    try:
        await _check_copartitioned(settings)
    except StartupError as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - the message is the whole story
        return 2
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
    )
    consumer = kafka_consumer(
        access,
        group_id=settings.rules_group,
        client_id=f"rules-{settings.instance_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy=(RangePartitionAssignor,),
        max_poll_records=settings.rules_batch_max,
        fetch_max_bytes=settings.rules_fetch_max_bytes,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # Let the broker gather records for a moment: fewer, larger batches (see docs/rules.md).
        fetch_min_bytes=settings.rules_fetch_min_bytes,
        fetch_max_wait_ms=settings.rules_fetch_max_wait_ms,
        session_timeout_ms=settings.rules_session_timeout_ms,
        heartbeat_interval_ms=max(settings.rules_session_timeout_ms // 10, 100),
    )
    producer = kafka_producer(
        access,
        client_id=f"rules-{settings.instance_id}",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    publisher = TicketPublisher(
        producer=producer, pool=pool, topic=settings.topic_tickets, metrics=metrics
    )
    worker = RulesWorker(
        settings=settings,
        ruleset=ruleset,
        pool=pool,
        consumer=consumer,
        publisher=publisher,
        metrics=metrics,
        set_aside=SetAside(
            producer=producer,
            topic=settings.topic_deadletter,
            consumer=settings.rules_group,
            counter=metrics.set_aside,
        ),
    )
    try:
        async with serve_ops(
            host=settings.metrics_host,
            port=settings.metrics_port,
            registry=registry,
            readiness=worker.readiness,
        ) as server:
            await producer.start()
            await worker.start()
            await consumer.start()
            consumer.subscribe(
                [settings.topic_telemetry, settings.topic_status], listener=worker.listener()
            )
            log.info(
                "rules running",
                extra={
                    "group": settings.rules_group,
                    "rules": len(ruleset.rules),
                    "rules_file": ruleset.source,
                    "ops_port": server.sockets[0].getsockname()[1],
                },
            )
            if ready is not None:
                ready.set()
            try:
                await worker.run(stop)
            except Exception:
                # Nothing in the data or an outage ends the loop; a bug does. /readyz turns red,
                # and the process exits non-zero so its supervisor restarts it.
                worker.failed = True
                log.exception("the rules loop ended unexpectedly; stopping")
                return 1
            # graceful: the batch in flight is done; persist liveness and leave the group
            async with asyncio.timeout(settings.shutdown_timeout_s):
                await worker.close()
    finally:
        with contextlib.suppress(Exception):  # best effort: each client closes on its own
            await consumer.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        await pool.close()
        log.info(
            "rules stopped",
            extra={
                "events_processed": worker.processed,
                "batches": worker.batches,
                "uptime_s": round(time.monotonic() - started, 1),
            },
        )
    return 0


async def _main(settings: RulesSettings, ruleset: RuleSet) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    return await run(settings, ruleset, stop=stop)


@entry_point("cityops rules")
def main(argv: list[str]) -> int:
    """Entry point of `cityops rules`."""
    parser = ServiceParser(prog="cityops rules", description=__doc__)
    parser.add_argument(
        "--check",
        nargs="?",
        const="",
        metavar="RULE_FILE",
        help="validate a rule file (default: the shipped one) and exit: 0 valid, 2 invalid",
    )
    args = parser.parse_args(argv)
    load_configured_kinds()  # a bad kind file: one line, exit 2
    if args.check is not None:
        try:
            checked = load_rules(Path(args.check) if args.check else None)
        except RuleFileError as exc:
            raise ConfigError(str(exc)) from None
        print(f"{checked.source}: {len(checked.rules)} rules OK")
        return 0
    settings = load_settings(RulesSettings)
    try:
        ruleset = load_rules(settings.rules_file)
    except RuleFileError as exc:
        raise ConfigError(f"CITYOPS_RULES_FILE: {exc}") from None
    start_logging("rules", settings)
    return asyncio.run(_main(settings, ruleset))
