"""SQL of the read model: batched writes of state, history and connectivity; partitions."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import date, timedelta

from cityops.api.db import Conn
from cityops.api.projector.fold import ConnectivityRow, ReadingRow
from cityops.common.kinds import Kind


def _count(status: str) -> int:
    """Rows affected, from a command status such as `DELETE 42`."""
    return int(status.rsplit(" ", 1)[-1])


# One statement writes a whole batch: history, newest state and connectivity. A single
# statement is its own transaction, so the batch costs one round trip (Bind/Execute/Sync of a
# prepared statement) instead of BEGIN + three statements + COMMIT; the data-modifying CTEs run
# on one snapshot and touch three different tables, so none needs to see another's rows.
_WRITE_BATCH_SQL = """
WITH u AS MATERIALIZED (
    SELECT t.device_id, t.kind, t.seq, t.ts, t.received_at, t.reading::jsonb AS reading, t.newest
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::timestamptz[],
                $6::text[], $7::bool[]) AS t(device_id, kind, seq, ts, received_at, reading, newest)
), inserted AS (
    -- history: a replayed (device_id, ts, seq) is skipped
    INSERT INTO readings (device_id, kind, seq, ts, received_at, reading)
    SELECT device_id, kind, seq, ts, received_at, reading FROM u
    ON CONFLICT DO NOTHING
    RETURNING 1
), moved AS (
    -- latest state: only forward, by seq
    INSERT INTO device_state AS s (device_id, kind, seq, ts, received_at, reading, updated_at)
    SELECT device_id, kind, seq, ts, received_at, reading, now() FROM u WHERE newest
    ON CONFLICT (device_id) DO UPDATE SET
        kind = excluded.kind, seq = excluded.seq, ts = excluded.ts,
        received_at = excluded.received_at, reading = excluded.reading, updated_at = now()
    WHERE excluded.seq > s.seq
    RETURNING 1
), c AS (
    SELECT * FROM unnest($8::text[], $9::bool[], $10::timestamptz[], $11::timestamptz[])
        AS c(device_id, online, status_at, seen_at)
), c_moved AS (
    -- connectivity: the newest online flag (by status_at) and the latest last_seen_at
    UPDATE device_connectivity d SET
        online = CASE WHEN c.status_at >= d.status_at THEN c.online ELSE d.online END,
        changed_at = CASE WHEN c.status_at >= d.status_at AND c.online <> d.online
                          THEN c.status_at ELSE d.changed_at END,
        status_at = greatest(d.status_at, c.status_at),
        last_seen_at = greatest(d.last_seen_at, c.seen_at)
    FROM c WHERE d.device_id = c.device_id
    RETURNING d.device_id
), c_new AS (
    INSERT INTO device_connectivity (device_id, online, last_seen_at, changed_at, status_at)
    SELECT c.device_id, c.online, coalesce(c.seen_at, c.status_at), c.status_at, c.status_at
    FROM c WHERE NOT EXISTS (SELECT 1 FROM c_moved WHERE c_moved.device_id = c.device_id)
    ON CONFLICT (device_id) DO NOTHING
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM inserted) AS inserted
"""


async def write_batch(
    conn: Conn,
    *,
    readings: Collection[ReadingRow],
    states: Mapping[str, ReadingRow],
    connectivity: Collection[ConnectivityRow],
) -> tuple[int, int]:
    """Write one batch atomically in one statement; returns (state rows moved, readings inserted).

    `readings` are distinct by (device_id, ts, seq); `states` holds the newest reading of each
    device, which moves `device_state` if its seq is newer. A replayed batch changes nothing.
    """
    if not readings and not connectivity:
        return 0, 0

    def is_newest(r: ReadingRow) -> bool:
        state = states.get(r.device_id)
        return state is not None and state.seq == r.seq and state.ts == r.ts

    row = await conn.fetchrow(
        _WRITE_BATCH_SQL,
        [r.device_id for r in readings],
        [r.kind for r in readings],
        [r.seq for r in readings],
        [r.ts for r in readings],
        [r.received_at for r in readings],
        [r.values_json for r in readings],
        [is_newest(r) for r in readings],
        [c.device_id for c in connectivity],
        [c.online for c in connectivity],
        [c.status_at for c in connectivity],
        [c.seen_at for c in connectivity],
    )
    return (0, 0) if row is None else (int(row["moved"]), int(row["inserted"]))


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
