"""SQL of the device resources: registry reads with state, provisioning, credentials."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from cityops.api.db import Conn, Executor, Params
from cityops.api.http.params import BBox

_DEVICE_COLUMNS = """
    d.device_id, d.kind, d.district, d.zone, d.lat, d.lon, d.reporting_interval_s,
    d.metadata::text AS metadata, d.enabled, d.created_at, d.updated_at,
    s.seq AS state_seq, s.ts AS state_ts, s.received_at AS state_received_at,
    s.reading::text AS state_values,
    c.online, c.last_seen_at, c.changed_at
"""
_FROM = """
    FROM devices d
    LEFT JOIN device_state s ON s.device_id = d.device_id
    LEFT JOIN device_connectivity c ON c.device_id = d.device_id
"""
# Columns a PATCH may change.
PATCHABLE = frozenset(
    {"district", "zone", "lat", "lon", "reporting_interval_s", "metadata", "enabled"}
)
STATUS_FILTERS = {
    "online": "c.online IS TRUE",
    "offline": "c.online IS FALSE",
    "never_seen": "c.device_id IS NULL",
}


async def get_device(conn: Executor, *, device_id: str) -> Any:
    """One device with state, connectivity and its open tickets (JSON text), or None."""
    return await conn.fetchrow(
        f"""
        SELECT {_DEVICE_COLUMNS},
            (SELECT coalesce(json_agg(json_build_object(
                        'id', t.id, 'rule', t.rule, 'priority', t.priority, 'status', t.status,
                        'department', t.department, 'opened_at', t.opened_at,
                        'due_at', t.due_at, 'version', t.version) ORDER BY t.id), '[]')::text
             FROM tickets t
             WHERE t.device_id = d.device_id
               AND t.status IN ('open', 'acknowledged', 'in_progress')) AS open_tickets
        {_FROM}
        WHERE d.device_id = $1
        """,  # noqa: S608 - constant fragments, values are parameters
        device_id,
    )


async def list_devices(
    conn: Executor,
    *,
    kind: str | None,
    district: str | None,
    status: str | None,
    bbox: BBox | None,
    after: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """A page of devices in device_id order, filtered; fetches limit + 1 to see if more follow."""
    where: list[str] = []
    param = Params()

    # With a bbox the page is cut from the devices in the box, found through the GiST index
    # on point(lon, lat) (MATERIALIZED: the planner cannot instead walk the primary key in id
    # order hoping to meet 100 matches soon, a full scan when the box is sparse).
    source, t = "devices d", "d"
    prefix = ""
    if bbox is not None:
        corners = (
            f"point({param(bbox.min_lon)}, {param(bbox.min_lat)}), "
            f"point({param(bbox.max_lon)}, {param(bbox.max_lat)})"
        )
        in_box = (
            "SELECT device_id, kind, district FROM devices "
            "WHERE lat IS NOT NULL AND point(lon, lat) <@ box("
        )
        prefix = f"WITH in_box AS MATERIALIZED ({in_box}{corners})) "
        source, t = "in_box b", "b"
    if kind is not None:
        where.append(f"{t}.kind = {param(kind)}")
    if district is not None:
        where.append(f"{t}.district = {param(district)}")
    if status is not None:
        where.append(STATUS_FILTERS[status])
    if after is not None:
        where.append(f"{t}.device_id > {param(after)}")
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    # The page of ids is chosen first (plus connectivity for a status filter), then joined
    # with the registry and state: the joins see at most limit + 1 rows, never the fleet.
    status_join = (
        f"LEFT JOIN device_connectivity c ON c.device_id = {t}.device_id" if status else ""
    )
    page = (
        f"SELECT {t}.device_id FROM {source} {status_join} {clause} "  # noqa: S608 - $n only
        f"ORDER BY {t}.device_id LIMIT {param(limit + 1)}"
    )
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{prefix}SELECT {_DEVICE_COLUMNS} FROM ({page}) AS page "  # noqa: S608 - see above
        "JOIN devices d ON d.device_id = page.device_id "
        "LEFT JOIN device_state s ON s.device_id = d.device_id "
        "LEFT JOIN device_connectivity c ON c.device_id = d.device_id "
        "ORDER BY d.device_id",
        *param.values,
    )
    return rows


def _device_arrays(devices: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [d["device_id"] for d in devices],
        [d["kind"] for d in devices],
        [d.get("district") or "unassigned" for d in devices],
        [d.get("zone") for d in devices],
        [d.get("lat") for d in devices],
        [d.get("lon") for d in devices],
        [d.get("reporting_interval_s") for d in devices],
        [orjson.dumps(d.get("metadata") or {}).decode() for d in devices],
        [bool(d.get("enabled", True)) for d in devices],
    ]


_UNNEST = """
    SELECT u.device_id, u.kind, u.district, u.zone, u.lat, u.lon,
           coalesce(u.reporting_interval_s, 300), u.metadata::jsonb, u.enabled
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[],
                $7::int[], $8::text[], $9::bool[])
         AS u(device_id, kind, district, zone, lat, lon, reporting_interval_s, metadata, enabled)
"""


async def insert_devices(conn: Conn, *, devices: Sequence[Mapping[str, Any]]) -> list[str]:
    """Insert new devices; returns the ids inserted (an existing id is left untouched)."""
    if not devices:
        return []
    rows = await conn.fetch(
        f"""
        INSERT INTO devices (device_id, kind, district, zone, lat, lon, reporting_interval_s,
                             metadata, enabled)
        {_UNNEST}
        ON CONFLICT (device_id) DO NOTHING
        RETURNING device_id
        """,
        *_device_arrays(devices),
    )
    return [row["device_id"] for row in rows]


async def update_devices(conn: Conn, *, devices: Sequence[Mapping[str, Any]]) -> list[str]:
    """Update existing devices of the same kind from import rows; returns the ids updated."""
    if not devices:
        return []
    rows = await conn.fetch(
        f"""
        UPDATE devices d SET district = u.district, zone = u.zone, lat = u.lat, lon = u.lon,
            reporting_interval_s = u.reporting_interval_s, metadata = u.metadata,
            enabled = u.enabled, updated_at = now()
        FROM ({_UNNEST}) AS u(device_id, kind, district, zone, lat, lon, reporting_interval_s,
                              metadata, enabled)
        WHERE d.device_id = u.device_id AND d.kind = u.kind
        RETURNING d.device_id
        """,  # noqa: S608 - constant
        *_device_arrays(devices),
    )
    return [row["device_id"] for row in rows]


async def existing_kinds(conn: Conn, *, device_ids: Sequence[str]) -> dict[str, str]:
    """device_id -> kind for those of `device_ids` already in the registry."""
    rows = await conn.fetch(
        "SELECT device_id, kind FROM devices WHERE device_id = ANY($1::text[])", list(device_ids)
    )
    return {row["device_id"]: row["kind"] for row in rows}


async def insert_credentials(
    conn: Conn, *, device_ids: Sequence[str], password_hashes: Sequence[str]
) -> None:
    """Store the MQTT password hashes of new devices (replacing any earlier one)."""
    await conn.execute(
        """
        INSERT INTO device_credentials (device_id, password_hash)
        SELECT * FROM unnest($1::text[], $2::text[])
        ON CONFLICT (device_id) DO UPDATE SET
            password_hash = excluded.password_hash, created_at = now(), revoked_at = NULL
        """,
        list(device_ids),
        list(password_hashes),
    )


async def patch_device(conn: Conn, *, device_id: str, changes: Mapping[str, Any]) -> bool:
    """Apply `changes` (keys from PATCHABLE) to a device; returns whether it exists."""
    unknown = set(changes) - PATCHABLE
    if unknown:
        raise ValueError(f"not patchable: {sorted(unknown)}")
    sets: list[str] = []
    param = Params()
    key = param(device_id)
    for column, value in changes.items():
        if column == "metadata":
            sets.append(f"{column} = {param(orjson.dumps(value).decode())}::jsonb")
        else:
            sets.append(f"{column} = {param(value)}")
    sets.append("updated_at = now()")
    status = await conn.execute(
        f"UPDATE devices SET {', '.join(sets)} WHERE device_id = {key}",  # noqa: S608 - whitelisted
        *param.values,
    )
    return status != "UPDATE 0"


async def delete_device(conn: Conn, *, device_id: str) -> str | None:
    """Delete a device (its credentials go with it); returns its kind, or None if absent."""
    kind: str | None = await conn.fetchval(
        "DELETE FROM devices WHERE device_id = $1 RETURNING kind", device_id
    )
    return kind


async def set_credentials_revoked(conn: Conn, *, device_id: str, revoked: bool) -> None:
    """Mark a device's credentials revoked (disabled device) or active again."""
    await conn.execute(
        """
        UPDATE device_credentials
        SET revoked_at = CASE WHEN $2 THEN coalesce(revoked_at, now()) ELSE NULL END
        WHERE device_id = $1
        """,
        device_id,
        revoked,
    )


async def credential_states(
    conn: Conn, *, device_ids: Sequence[str] | None = None
) -> dict[str, str | None]:
    """device_id -> the hash the broker should accept, or None when revoked or disabled.

    With `device_ids` None: every device that has credentials.
    """
    query = """
        SELECT cr.device_id,
               CASE WHEN cr.revoked_at IS NULL AND d.enabled THEN cr.password_hash END AS hash
        FROM device_credentials cr JOIN devices d ON d.device_id = cr.device_id
    """
    if device_ids is None:
        rows = await conn.fetch(query)
    else:
        rows = await conn.fetch(query + " WHERE cr.device_id = ANY($1::text[])", list(device_ids))
    states: dict[str, str | None] = {row["device_id"]: row["hash"] for row in rows}
    if device_ids is not None:
        for device_id in device_ids:
            states.setdefault(device_id, None)  # deleted: remove from the broker
    return states


async def registry_rows(conn: Conn, *, device_ids: Sequence[str]) -> list[asyncpg.Record]:
    """Registry rows (for city.devices.v1) of these devices."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT device_id, kind, district, zone, lat, lon, reporting_interval_s,
               metadata::text AS metadata, enabled, updated_at
        FROM devices WHERE device_id = ANY($1::text[])
        """,
        list(device_ids),
    )
    return rows
