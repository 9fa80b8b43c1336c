"""The device registry held in memory: a PostgreSQL snapshot kept current by three paths.

1. `keep_fresh`: the snapshot, then an incremental refresh every CITYOPS_INGEST_REGISTRY_REFRESH_S
   and a full reload every CITYOPS_INGEST_REGISTRY_FULL_RELOAD_S. PostgreSQL is the source of
   truth; this is the safety net that catches every change, published or not.
2. `registry_follow.DevicesFollower`: the API's change events on `city.devices.v1`, applied
   within milliseconds of the commit.
3. `registry_lookup.MissResolver`: a batched lookup of ids a reading names but the cache has
   never heard of, before those readings are decided.

Every change carries the row's `updated_at`; a change older than what the cache already holds
for that device is ignored, so the three paths can interleave in any order without an older
row overwriting a newer one (e.g. a refresh query that started before a PATCH returning after
the PATCH's event was applied).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol

import asyncpg

from cityops.common.kinds import Kind
from cityops.common.registry import load_devices

log = logging.getLogger(__name__)

# `updated_at` is the writing transaction's start time, so a slow transaction can commit a row
# older than the newest one already seen; each refresh re-reads this much before the mark.
_REREAD_MARGIN = timedelta(seconds=30)
# Changes that arrive while a full snapshot is being read are replayed onto it; past this many
# the rest are left to the next incremental refresh (which re-reads the last 30 s anyway).
_MAX_JOURNAL = 50_000
# Deleted devices remembered (with the version they had) so that a query that read the row just
# before the delete cannot bring it back; cleared by every full reload.
_MAX_DELETED = 100_000


class RegistryRow(Protocol):
    """The part of a registry row ingest needs (`cityops.common.registry.Device` is one)."""

    @property
    def device_id(self) -> str:
        """Device id."""

    @property
    def kind(self) -> Kind:
        """Registered kind."""

    @property
    def enabled(self) -> bool:
        """Disabled devices are refused."""

    @property
    def updated_at(self) -> datetime | None:
        """The row's version (transaction start time of its last write)."""


class RegistryCache:
    """device id -> kind of every enabled device; the validator's RegistryView."""

    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}
        # updated_at of every device row known (enabled or not): the version changes compare to.
        self._versions: dict[str, datetime | None] = {}
        self._deleted: dict[str, datetime | None] = {}
        self._journal: list[tuple[str, RegistryRow | None]] | None = None
        self._high_water: datetime | None = None
        self.loaded = asyncio.Event()
        self.last_refresh_ok: float | None = None

    def __len__(self) -> int:
        return len(self._kinds)

    def kind_of(self, device_id: str) -> Kind | None:
        """The registered kind of an enabled device, or None."""
        return self._kinds.get(device_id)

    def knows(self, device_id: str) -> bool:
        """True when the cache holds a row for the device (enabled or disabled)."""
        return device_id in self._versions

    def begin_snapshot(self) -> None:
        """A full snapshot is being read: journal changes so that `replace` can replay them."""
        self._journal = []

    def abandon_snapshot(self) -> None:
        """The snapshot read failed: stop journaling."""
        self._journal = None

    def replace(self, devices: Iterable[RegistryRow]) -> None:
        """Install a full snapshot, then replay the changes applied while it was read."""
        kinds: dict[str, Kind] = {}
        versions: dict[str, datetime | None] = {}
        high = None
        for device in devices:
            if device.enabled:
                kinds[device.device_id] = device.kind
            versions[device.device_id] = device.updated_at
            if device.updated_at is not None and (high is None or device.updated_at > high):
                high = device.updated_at
        journal, self._journal = self._journal, None
        self._kinds = kinds
        self._versions = versions
        self._deleted = {}
        self._high_water = high
        for device_id, row in journal or ():
            if row is None:
                self.forget(device_id)
            else:
                self.upsert(row)
        self.loaded.set()

    def apply(self, devices: Iterable[RegistryRow]) -> int:
        """Apply rows of an incremental PostgreSQL refresh; returns how many were applied."""
        count = 0
        for device in devices:
            if self.upsert(device):
                count += 1
            if device.updated_at is not None and (
                self._high_water is None or device.updated_at > self._high_water
            ):
                self._high_water = device.updated_at
        return count

    def upsert(self, row: RegistryRow) -> bool:
        """Apply one row unless the cache already holds a newer version; True if applied.

        Does not move the refresh high-water mark: only rows read from PostgreSQL do, so a
        published change can never make the refresh skip an unpublished one.
        """
        device_id = row.device_id
        version = row.updated_at
        if self._journal is not None and len(self._journal) < _MAX_JOURNAL:
            self._journal.append((device_id, row))
        if version is not None:
            known = self._versions.get(device_id)
            if known is not None and version < known:
                return False
            if device_id in self._deleted:
                gone = self._deleted[device_id]
                if gone is not None and version <= gone:
                    return False  # the row as it was before it was deleted
                del self._deleted[device_id]
        self._versions[device_id] = version
        if row.enabled:
            self._kinds[device_id] = row.kind
        else:
            self._kinds.pop(device_id, None)
        return True

    def forget(self, device_id: str) -> bool:
        """A device was deleted; True if the cache held it."""
        if self._journal is not None and len(self._journal) < _MAX_JOURNAL:
            self._journal.append((device_id, None))
        self._kinds.pop(device_id, None)
        held = device_id in self._versions
        version = self._versions.pop(device_id, None)
        if len(self._deleted) >= _MAX_DELETED:
            self._deleted.pop(next(iter(self._deleted)))
        self._deleted[device_id] = version
        return held

    @property
    def high_water(self) -> datetime | None:
        """The newest `updated_at` read from PostgreSQL; the next refresh starts after it."""
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
                cache.begin_snapshot()
                try:
                    snapshot = await load_devices(conn)
                except BaseException:
                    cache.abandon_snapshot()
                    raise
                cache.replace(snapshot)
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
