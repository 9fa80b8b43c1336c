"""SQL of readings history queries: raw points and `date_bin` buckets of one field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from cityops.api.db import Executor

# Buckets are aligned to the epoch, so the same width always gives the same boundaries.
_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


async def device_kind(conn: Executor, *, device_id: str) -> str | None:
    """The kind of a registered device, or None."""
    kind: str | None = await conn.fetchval(
        "SELECT kind FROM devices WHERE device_id = $1", device_id
    )
    return kind


async def raw(
    conn: Executor,
    *,
    device_id: str,
    start: datetime,
    end: datetime,
    field: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Readings in [start, end), newest first; with `field`, only that value in `reading`."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT seq, ts, received_at,
               CASE WHEN $4::text IS NULL THEN reading
                    ELSE jsonb_strip_nulls(jsonb_build_object($4::text, reading -> $4::text))
               END::text AS reading
        FROM readings
        WHERE device_id = $1 AND ts >= $2 AND ts < $3
        ORDER BY ts DESC, seq DESC
        LIMIT $5
        """,
        device_id,
        start,
        end,
        field,
        limit,
    )
    return rows


async def bucketed(
    conn: Executor,
    *,
    device_id: str,
    start: datetime,
    end: datetime,
    field: str,
    bucket: timedelta,
) -> list[asyncpg.Record]:
    """min / max / avg / last of one numeric or boolean field per bucket (booleans as 0/1)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT date_bin($5::interval, ts, $6::timestamptz) AS start,
               count(v) AS count, min(v) AS min, max(v) AS max, avg(v) AS avg,
               (array_agg(v ORDER BY ts DESC, seq DESC) FILTER (WHERE v IS NOT NULL))[1] AS last
        FROM (
            SELECT ts, seq,
                   CASE jsonb_typeof(reading -> $4::text)
                       WHEN 'number' THEN (reading ->> $4::text)::float8
                       WHEN 'boolean' THEN (reading ->> $4::text)::boolean::int::float8
                   END AS v
            FROM readings
            WHERE device_id = $1 AND ts >= $2 AND ts < $3
        ) AS points
        GROUP BY 1
        ORDER BY 1
        """,
        device_id,
        start,
        end,
        field,
        bucket,
        _ORIGIN,
    )
    return rows
