"""The device registry held in memory, refreshed from PostgreSQL on a timer (never per message)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

import asyncpg

from cityops.common.kinds import Kind
from cityops.common.registry import Device, load_devices

log = logging.getLogger(__name__)

# `updated_at` is the writing transaction's start time, so a slow transaction can commit a row
# older than the newest one already seen; each refresh re-reads this much before the mark.
_REREAD_MARGIN = timedelta(seconds=30)


class RegistryCache:
    """device id -> kind of every enabled device; the validator's RegistryView."""

    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}
        self._high_water: datetime | None = None
        self.loaded = asyncio.Event()
        self.last_refresh_ok: float | None = None

    def __len__(self) -> int:
        return len(self._kinds)

    def kind_of(self, device_id: str) -> Kind | None:
        """The registered kind of an enabled device, or None."""
        return self._kinds.get(device_id)

    def replace(self, devices: Iterable[Device]) -> None:
        """Install a full snapshot."""
        kinds: dict[str, Kind] = {}
        high = None
        for device in devices:
            if device.enabled:
                kinds[device.device_id] = device.kind
            if device.updated_at is not None and (high is None or device.updated_at > high):
                high = device.updated_at
        self._kinds = kinds
        self._high_water = high
        self.loaded.set()

    def apply(self, devices: Iterable[Device]) -> int:
        """Apply changed rows; returns how many were applied."""
        count = 0
        for device in devices:
            count += 1
            if device.enabled:
                self._kinds[device.device_id] = device.kind
            else:
                self._kinds.pop(device.device_id, None)
            if device.updated_at is not None and (
                self._high_water is None or device.updated_at > self._high_water
            ):
                self._high_water = device.updated_at
        return count

    @property
    def high_water(self) -> datetime | None:
        """The newest `updated_at` seen; the next incremental refresh starts after it."""
        return self._high_water


async def keep_fresh(
    cache: RegistryCache,
    *,
    database_url: str,
    refresh_s: float,
    full_reload_s: float,
    stop: asyncio.Event,
) -> None:
    """Load the registry, then refresh it every `refresh_s` until `stop`; errors back off."""
    conn: asyncpg.Connection | None = None
    last_full = 0.0
    delay = refresh_s
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(database_url, timeout=10)
            if not cache.loaded.is_set() or time.monotonic() - last_full >= full_reload_s:
                # A full reload also forgets deleted devices, which an incremental one cannot see.
                cache.replace(await load_devices(conn))
                last_full = time.monotonic()
                log.info("registry loaded", extra={"devices": len(cache)})
            else:
                changed = await load_devices(conn, changed_since=_minus_epsilon(cache.high_water))
                if changed:
                    cache.apply(changed)
                    log.debug("registry refreshed", extra={"changed": len(changed)})
            cache.last_refresh_ok = time.monotonic()
            delay = refresh_s
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("registry refresh failed: %s", exc, extra={"retry_in_s": delay})
            if conn is not None:
                conn.terminate()
                conn = None
            delay = min(delay * 2, 60.0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            continue
    if conn is not None:
        await conn.close()


def _minus_epsilon(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment - _REREAD_MARGIN
