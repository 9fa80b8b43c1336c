"""SQL of the API event outbox (`api_outbox`): append in the caller's transaction, read, delete."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from cityops.api.db import Conn, Executor

# pg_advisory_xact_lock key: one replica at a time relays the outbox, so replicas queue up
# instead of publishing the same rows twice or out of order.
RELAY_LOCK = 0x63697479_0A03


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One Kafka record to produce: `payload` None is a tombstone."""

    topic: str
    key: str
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An outbox row claimed for publishing."""

    id: int
    event: OutboxEvent


async def append(conn: Conn, *, events: Sequence[OutboxEvent]) -> None:
    """Add `events` to the outbox in this order (call inside the change's transaction)."""
    if not events:
        return
    await conn.execute(
        """
        INSERT INTO api_outbox (topic, key, payload)
        SELECT u.topic, u.key, u.payload::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
             AS u(topic, key, payload, n)
        ORDER BY u.n
        """,
        [e.topic for e in events],
        [e.key for e in events],
        [None if e.payload is None else e.payload.decode() for e in events],
    )


async def lock_relay(conn: Conn) -> None:
    """Wait for the relay lock, held until this transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", RELAY_LOCK)


async def oldest(conn: Conn, *, limit: int) -> list[StoredEvent]:
    """The `limit` oldest rows, in publishing order."""
    rows = await conn.fetch(
        """
        SELECT id, topic, key, payload::text AS payload FROM api_outbox
        ORDER BY id LIMIT $1
        """,
        limit,
    )
    return [
        StoredEvent(
            row["id"],
            OutboxEvent(
                row["topic"],
                row["key"],
                None if row["payload"] is None else row["payload"].encode(),
            ),
        )
        for row in rows
    ]


async def delete(conn: Conn, *, ids: Sequence[int]) -> None:
    """Forget rows Kafka acknowledged."""
    if ids:
        await conn.execute("DELETE FROM api_outbox WHERE id = ANY($1::bigint[])", list(ids))


async def backlog(conn: Executor) -> tuple[int, float]:
    """(rows waiting, age in seconds of the oldest; 0 when empty)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM api_outbox) AS events,
               greatest(coalesce(extract(epoch FROM now() - (
                   SELECT created_at FROM api_outbox ORDER BY id LIMIT 1)), 0), 0)::float8
                   AS age_s
        """
    )
    assert row is not None
    return int(row["events"]), float(row["age_s"])
