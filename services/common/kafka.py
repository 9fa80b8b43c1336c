"""Kafka helpers shared by the services: topic creation."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap: str,
    *,
    topics: Mapping[str, int],
    compacted: Collection[str] = (),
    replication_factor: int = 1,
) -> list[str]:
    """Create the missing topics (name -> partitions); returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs={"cleanup.policy": "compact"} if name in compacted else {},
            )
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)
            log.info("created topics", extra={"topics": [t.name for t in missing]})
        return [t.name for t in missing]
    finally:
        await admin.close()
