"""SQL of the read model: batched writes of state, history and connectivity; partitions."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import date, timedelta

from cityops.api.db import Conn
from cityops.api.projection import ConnectivityRow, ReadingRow
from cityops.common.kinds import Kind


def _count(status: str) -> int:
    """Rows affected, from a command status such as `INSERT 0 42`."""
    return int(status.rsplit(" ", 1)[-1])


async def upsert_states(conn: Conn, *, states: Collection[ReadingRow]) -> int:
    """Move `device_state` forward where the seq is newer; returns the rows moved."""
    if not states:
        return 0
    status = await conn.execute(
        """
        INSERT INTO device_state AS s (device_id, kind, seq, ts, received_at, reading, updated_at)
        SELECT u.device_id, u.kind, u.seq, u.ts, u.received_at, u.reading::jsonb, now()
        FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::timestamptz[],
                    $6::text[]) AS u(device_id, kind, seq, ts, received_at, reading)
        ON CONFLICT (device_id) DO UPDATE SET
            kind = excluded.kind, seq = excluded.seq, ts = excluded.ts,
            received_at = excluded.received_at, reading = excluded.reading, updated_at = now()
        WHERE excluded.seq > s.seq
        """,
        [r.device_id for r in states],
        [r.kind for r in states],
        [r.seq for r in states],
        [r.ts for r in states],
        [r.received_at for r in states],
        [r.values_json for r in states],
    )
    return _count(status)


async def insert_readings(conn: Conn, *, readings: Collection[ReadingRow]) -> int:
    """Append readings to history; a replayed (device_id, ts, seq) is skipped. Returns inserted."""
    if not readings:
        return 0
    status = await conn.execute(
        """
        INSERT INTO readings (device_id, kind, seq, ts, received_at, reading)
        SELECT u.device_id, u.kind, u.seq, u.ts, u.received_at, u.reading::jsonb
        FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::timestamptz[],
                    $6::text[]) AS u(device_id, kind, seq, ts, received_at, reading)
        ON CONFLICT DO NOTHING
        """,
        [r.device_id for r in readings],
        [r.kind for r in readings],
        [r.seq for r in readings],
        [r.ts for r in readings],
        [r.received_at for r in readings],
        [r.values_json for r in readings],
    )
    return _count(status)


async def upsert_connectivity(conn: Conn, *, rows: Collection[ConnectivityRow]) -> None:
    """Apply the newest online flag (by status_at) and the latest last_seen_at per device."""
    if not rows:
        return
    await conn.execute(
        """
        WITH u AS (
            SELECT * FROM unnest($1::text[], $2::bool[], $3::timestamptz[], $4::timestamptz[])
                AS u(device_id, online, status_at, seen_at)
        ), moved AS (
            UPDATE device_connectivity c SET
                online = CASE WHEN u.status_at >= c.status_at THEN u.online ELSE c.online END,
                changed_at = CASE WHEN u.status_at >= c.status_at AND u.online <> c.online
                                  THEN u.status_at ELSE c.changed_at END,
                status_at = greatest(c.status_at, u.status_at),
                last_seen_at = greatest(c.last_seen_at, u.seen_at)
            FROM u WHERE c.device_id = u.device_id
            RETURNING c.device_id
        )
        INSERT INTO device_connectivity (device_id, online, last_seen_at, changed_at, status_at)
        SELECT u.device_id, u.online, coalesce(u.seen_at, u.status_at), u.status_at, u.status_at
        FROM u WHERE NOT EXISTS (SELECT 1 FROM moved WHERE moved.device_id = u.device_id)
        ON CONFLICT (device_id) DO NOTHING
        """,
        [r.device_id for r in rows],
        [r.online for r in rows],
        [r.status_at for r in rows],
        [r.seen_at for r in rows],
    )


async def ensure_partitions(conn: Conn, *, first_day: date, days: int) -> int:
    """Create the daily `readings` partitions for [first_day, first_day + days)."""
    created: int = await conn.fetchval(
        "SELECT cityops_ensure_reading_partitions($1::date, $2::int)", first_day, days
    )
    return created


async def apply_retention(
    conn: Conn,
    *,
    today: date,
    retention_days: Mapping[Kind, int],
    delete_batch: int = 50_000,
) -> tuple[int, int]:
    """Drop partitions older than the longest retention; delete older rows of shorter-lived kinds.

    Returns (partitions dropped, rows deleted).
    """
    longest = max(retention_days.values())
    dropped: int = await conn.fetchval(
        "SELECT cityops_drop_reading_partitions($1::date)", today - timedelta(days=longest)
    )
    deleted = 0
    for kind, days in retention_days.items():
        cutoff = today - timedelta(days=days)
        # Bounded deletes: a long retention change must not hold one huge transaction.
        while True:
            status = await conn.execute(
                """
                DELETE FROM readings WHERE (device_id, ts, seq) IN (
                    SELECT device_id, ts, seq FROM readings
                    WHERE kind = $1 AND ts < $2::date LIMIT $3)
                """,
                kind.value,
                cutoff,
                delete_batch,
            )
            count = _count(status)
            deleted += count
            if count < delete_batch:
                break
    return dropped, deleted
