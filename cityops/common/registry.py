"""SQL for the device registry, shared by every service that reads or writes it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from cityops.common.kinds import Kind

# How often each kind reports when the registry says nothing else; offline = 3x this.
DEFAULT_REPORTING_INTERVAL_S: dict[Kind, int] = {
    Kind.STREETLIGHT: 300,
    Kind.MANHOLE: 300,
    Kind.WASTEBIN: 600,
    Kind.PARKING: 60,
}


@dataclass(frozen=True, slots=True)
class Device:
    """One registry row."""

    device_id: str
    kind: Kind
    district: str = "unassigned"
    zone: str | None = None
    lat: float | None = None
    lon: float | None = None
    reporting_interval_s: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    updated_at: datetime | None = None

    @property
    def interval_s(self) -> int:
        """The reporting interval, falling back to the kind's default."""
        return self.reporting_interval_s or DEFAULT_REPORTING_INTERVAL_S[self.kind]


_COLUMNS = (
    "device_id, kind, district, zone, lat, lon, reporting_interval_s, metadata, enabled, updated_at"
)


def _device(row: asyncpg.Record) -> Device:
    return Device(
        device_id=row["device_id"],
        kind=Kind(row["kind"]),
        district=row["district"],
        zone=row["zone"],
        lat=row["lat"],
        lon=row["lon"],
        reporting_interval_s=row["reporting_interval_s"],
        metadata=json.loads(row["metadata"]),
        enabled=row["enabled"],
        updated_at=row["updated_at"],
    )


async def load_devices(
    conn: asyncpg.Connection | asyncpg.Pool, *, changed_since: datetime | None = None
) -> list[Device]:
    """Every device, or those updated after `changed_since` (for incremental cache refresh)."""
    if changed_since is None:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM devices")  # noqa: S608 - constant
    else:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM devices WHERE updated_at > $1",  # noqa: S608 - constant
            changed_since,
        )
    return [_device(row) for row in rows]


async def upsert_devices(conn: asyncpg.Connection, *, devices: Sequence[Device]) -> int:
    """Insert or update many devices in one statement; returns how many rows were written."""
    if not devices:
        return 0
    rows = await conn.fetch(
        """
        INSERT INTO devices AS d (device_id, kind, district, zone, lat, lon,
                                  reporting_interval_s, metadata, enabled)
        SELECT u.device_id, u.kind, u.district, u.zone, u.lat, u.lon,
               coalesce(u.reporting_interval_s, 300), u.metadata::jsonb, u.enabled
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[],
                    $7::int[], $8::text[], $9::bool[])
             AS u(device_id, kind, district, zone, lat, lon,
                  reporting_interval_s, metadata, enabled)
        ON CONFLICT (device_id) DO UPDATE SET
            kind = excluded.kind, district = excluded.district, zone = excluded.zone,
            lat = excluded.lat, lon = excluded.lon,
            reporting_interval_s = excluded.reporting_interval_s,
            metadata = excluded.metadata, enabled = excluded.enabled, updated_at = now()
        RETURNING device_id
        """,
        [d.device_id for d in devices],
        [d.kind.value for d in devices],
        [d.district for d in devices],
        [d.zone for d in devices],
        [d.lat for d in devices],
        [d.lon for d in devices],
        [d.interval_s for d in devices],
        [json.dumps(d.metadata) for d in devices],
        [d.enabled for d in devices],
    )
    return len(rows)
