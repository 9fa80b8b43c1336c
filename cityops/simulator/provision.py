"""Put the simulated fleet into the registry: through the API when it runs, or directly.

Directly: one `upsert_devices` statement per chunk (10k devices in well under a second), the
districts table, and, for one-connection-per-device mode, MQTT credentials written the way
the API writes them (hash in `device_credentials`, line in the broker's devices file under
the same advisory lock; the broker's auth plugin picks it up by itself). Through the API:
`POST /v1/devices:import` with JSON lines, which returns the credentials of the devices it
created.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import httpx
import orjson

from cityops.api.devices.credentials import (
    CREDENTIALS_LOCK,
    BrokerFiles,
    apply_to_files,
    new_password,
)
from cityops.api.devices.store import insert_credentials
from cityops.common import mqtt_auth
from cityops.common.registry import upsert_devices
from cityops.simulator.city import City, District

log = logging.getLogger(__name__)

CHUNK = 5000
API_CHUNK = 10_000
API_TIMEOUT_S = 120.0


class ProvisionError(RuntimeError):
    """The registry or the API refused the fleet."""


@dataclass(slots=True)
class Provisioned:
    """What provisioning did, and device passwords when per-device credentials were made."""

    written: int = 0
    created: int = 0
    updated: int = 0
    passwords: dict[str, str] = field(default_factory=dict)


async def upsert_districts(conn: asyncpg.Connection, *, districts: Sequence[District]) -> None:
    """Insert or update the city's districts with their centre and profile."""
    await conn.execute(
        """
        INSERT INTO districts AS d (district, name, metadata)
        SELECT u.district, u.name, u.metadata::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[]) AS u(district, name, metadata)
        ON CONFLICT (district) DO UPDATE SET
            name = excluded.name, metadata = d.metadata || excluded.metadata, updated_at = now()
        """,
        [d.district_id for d in districts],
        [d.district_id.replace("-", " ").title() for d in districts],
        [
            orjson.dumps(
                {
                    "lat": round(d.lat, 6),
                    "lon": round(d.lon, 6),
                    "bin_fill_pct_per_h": d.profile.bin_fill_pct_per_h,
                    "parking_demand": d.profile.parking_demand,
                    "source": "simulator",
                }
            ).decode()
            for d in districts
        ],
    )


async def provision_direct(
    *,
    database_url: str,
    city: City,
    broker_files: BrokerFiles | None = None,
    with_credentials: bool = False,
) -> Provisioned:
    """Upsert the fleet into the registry; with credentials, (re)set every device's password."""
    devices = [device.to_registry() for device in city.devices]
    result = Provisioned()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await upsert_districts(conn, districts=city.districts)
            for start in range(0, len(devices), CHUNK):
                result.written += await upsert_devices(conn, devices=devices[start : start + CHUNK])
        if with_credentials:
            result.passwords = await _set_credentials(
                conn, device_ids=[d.device_id for d in devices], broker_files=broker_files
            )
    finally:
        await conn.close()
    log.info(
        "fleet provisioned in the registry",
        extra={"devices": result.written, "credentials": len(result.passwords)},
    )
    return result


async def _set_credentials(
    conn: asyncpg.Connection, *, device_ids: list[str], broker_files: BrokerFiles | None
) -> dict[str, str]:
    if broker_files is None:
        raise ProvisionError(
            "per-device connections need CITYOPS_MQTT_DEVICE_PASSWORD_FILE "
            "(the broker's devices file)"
        )
    passwords = {device_id: new_password() for device_id in device_ids}

    def hash_all() -> dict[str, str]:
        return {device_id: mqtt_auth.hash_password(pw) for device_id, pw in passwords.items()}

    hashes = await asyncio.to_thread(hash_all)
    async with conn.transaction():
        # the API's lock: replicas and this tool apply broker changes in commit order
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CREDENTIALS_LOCK)
        await insert_credentials(
            conn, device_ids=list(hashes), password_hashes=list(hashes.values())
        )
        await asyncio.to_thread(apply_to_files, broker_files, dict(hashes))
    return passwords


async def provision_via_api(
    *, api_url: str, api_key: str, city: City, transport: httpx.AsyncBaseTransport | None = None
) -> Provisioned:
    """Import the fleet through `POST /v1/devices:import` (JSON lines), in chunks."""
    result = Provisioned()
    rows = [device.to_registry() for device in city.devices]
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/x-ndjson"}
    async with httpx.AsyncClient(
        base_url=api_url, timeout=API_TIMEOUT_S, transport=transport
    ) as client:
        for start in range(0, len(rows), API_CHUNK):
            body = b"\n".join(
                orjson.dumps(
                    {
                        "device_id": d.device_id,
                        "kind": d.kind.value,
                        "district": d.district,
                        "zone": d.zone,
                        "lat": d.lat,
                        "lon": d.lon,
                        "reporting_interval_s": d.interval_s,
                        "metadata": d.metadata,
                    }
                )
                for d in rows[start : start + API_CHUNK]
            )
            response = await client.post("/v1/devices:import", content=body, headers=headers)
            if response.status_code != 200:
                raise ProvisionError(
                    f"POST /v1/devices:import: {response.status_code} {response.text[:500]}"
                )
            outcome = response.json()
            if outcome.get("failed"):
                raise ProvisionError(f"the API refused rows: {outcome.get('errors', [])[:5]}")
            result.created += int(outcome.get("created", 0))
            result.updated += int(outcome.get("updated", 0))
            result.passwords.update(
                {c["device_id"]: c["password"] for c in outcome.get("credentials", [])}
            )
    result.written = result.created + result.updated
    log.info(
        "fleet provisioned through the API",
        extra={"devices_created": result.created, "devices_updated": result.updated},
    )
    return result
