"""SQL of the district resources: the list and the KPI summary, computed in PostgreSQL."""

from __future__ import annotations

import asyncpg

from cityops.api.db import Executor


async def list_districts(conn: Executor) -> list[asyncpg.Record]:
    """Every district that has devices or a settings row, with device counts per kind."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        WITH counts AS (
            SELECT district, kind, count(*) AS n FROM devices GROUP BY district, kind
        ), names AS (
            SELECT district FROM counts UNION SELECT district FROM districts
        )
        SELECT n.district, ds.name,
               coalesce(sum(c.n), 0)::int AS devices,
               coalesce(jsonb_object_agg(c.kind, c.n) FILTER (WHERE c.kind IS NOT NULL),
                        '{}')::text AS by_kind
        FROM names n
        LEFT JOIN counts c ON c.district = n.district
        LEFT JOIN districts ds ON ds.district = n.district
        GROUP BY n.district, ds.name
        ORDER BY n.district
        """
    )
    return rows


async def district_summary(
    conn: Executor, *, district: str, sla_window_days: int
) -> asyncpg.Record | None:
    """The KPIs of one district, or None when it has neither devices nor a settings row.

    A light works when it reports, its fault is none, it is not offline, and it has no open
    lamp_fault / lamp_out ticket.
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        WITH dev AS (
            SELECT d.device_id, d.kind, s.reading, c.online
            FROM devices d
            LEFT JOIN device_state s ON s.device_id = d.device_id
            LEFT JOIN device_connectivity c ON c.device_id = d.device_id
            WHERE d.district = $1 AND d.enabled
        ), lamp_tickets AS (
            SELECT DISTINCT device_id FROM tickets
            WHERE district = $1 AND rule IN ('lamp_fault', 'lamp_out')
              AND status IN ('open', 'acknowledged', 'in_progress')
        ), kpis AS (
            SELECT
                count(*)::int AS devices,
                count(*) FILTER (WHERE online)::int AS devices_online,
                count(*) FILTER (WHERE kind = 'streetlight' AND reading IS NOT NULL)::int
                    AS lights_reporting,
                count(*) FILTER (
                    WHERE kind = 'streetlight' AND reading IS NOT NULL
                      AND coalesce(reading ->> 'fault', 'none') = 'none'
                      AND online IS NOT FALSE
                      AND device_id NOT IN (SELECT device_id FROM lamp_tickets))::int
                    AS lights_working,
                count(*) FILTER (WHERE kind = 'wastebin' AND reading IS NOT NULL)::int
                    AS bins_reporting,
                count(*) FILTER (
                    WHERE kind = 'wastebin' AND (reading ->> 'fill_pct')::float8 >= 90)::int
                    AS bins_full,
                count(*) FILTER (WHERE kind = 'parking' AND reading IS NOT NULL)::int
                    AS parking_reporting,
                count(*) FILTER (
                    WHERE kind = 'parking' AND (reading ->> 'occupied')::boolean)::int
                    AS parking_occupied
            FROM dev
        ), open_tickets AS (
            SELECT coalesce(jsonb_object_agg(priority, n), '{}')::text AS by_priority
            FROM (SELECT priority, count(*) AS n FROM tickets
                  WHERE district = $1 AND status IN ('open', 'acknowledged', 'in_progress')
                  GROUP BY priority) p
        ), sla AS (
            SELECT
                count(*) FILTER (WHERE status IN ('open', 'acknowledged', 'in_progress')
                                   AND due_at < now())::int AS overdue,
                count(*) FILTER (WHERE resolved_at >= now() - make_interval(days => $2))::int
                    AS resolved_in_window,
                count(*) FILTER (WHERE resolved_at >= now() - make_interval(days => $2)
                                   AND resolved_at <= due_at)::int AS resolved_within_sla
            FROM tickets WHERE district = $1
        )
        SELECT kpis.*, open_tickets.by_priority, sla.*, now() AS computed_at,
               (kpis.devices > 0 OR EXISTS (SELECT 1 FROM districts WHERE district = $1)
                OR sla.resolved_in_window > 0 OR open_tickets.by_priority <> '{}') AS known
        FROM kpis, open_tickets, sla
        """,
        district,
        sla_window_days,
    )
    if row is None or not row["known"]:
        return None
    return row
