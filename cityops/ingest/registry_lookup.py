"""Look up, in PostgreSQL, devices a reading names but the registry cache has never heard of.

The devices topic brings a provisioned device into the cache milliseconds after the API's commit,
but a device can publish inside that window, or be provisioned by something that publishes no
event (a bulk SQL import). Before such a reading is dead-lettered as `unknown_device` the
pipeline asks `MissResolver` once, batched per loop turn. Bounds, so that a flood of bogus ids
cannot turn into a flood of queries or of held messages:

- at most `max_ids` distinct ids per lookup, one lookup per pipeline turn; misses past that are
  decided at once (dead-lettered) without one;
- a negative cache: an id PostgreSQL does not have is not asked about again for `absent_ttl_s`
  (the refresh interval), so each bogus id costs at most one query per interval; it holds at
  most `max_absent` ids, and when it is full of live entries new ids are not looked up;
- after a failed lookup (PostgreSQL down or slow) no lookups for `absent_ttl_s`;
- each lookup is bounded by `timeout_s`, the longest a reading is held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from cityops.common.kinds import Kind
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.registry_cache import RegistryCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """The registry columns ingest needs (a RegistryRow)."""

    device_id: str
    kind: Kind
    enabled: bool
    updated_at: datetime | None


Fetch = Callable[[Sequence[str]], Awaitable[list[DeviceRow]]]


async def fetch_devices(conn: asyncpg.Connection, *, device_ids: Sequence[str]) -> list[DeviceRow]:
    """The registry rows of `device_ids` that exist (one query)."""
    rows = await conn.fetch(
        "SELECT device_id, kind, enabled, updated_at FROM devices"
        " WHERE device_id = ANY($1::text[])",
        list(device_ids),
    )
    return [
        DeviceRow(
            device_id=row["device_id"],
            kind=Kind(row["kind"]),
            enabled=row["enabled"],
            updated_at=row["updated_at"],
        )
        for row in rows
    ]


class DatabaseLookup:
    """One PostgreSQL connection for lookups, opened on first use and reopened after errors."""

    def __init__(self, *, database_url: str) -> None:
        self._database_url = database_url
        self._conn: asyncpg.Connection | None = None

    async def __call__(self, device_ids: Sequence[str]) -> list[DeviceRow]:
        """Fetch the rows of `device_ids`; raises on database errors (after dropping the conn)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._database_url)
            return await fetch_devices(self._conn, device_ids=device_ids)
        except BaseException:
            if self._conn is not None:
                self._conn.terminate()  # a cancelled query leaves the connection unusable
                self._conn = None
            raise

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class MissResolver:
    """Decides which registry misses to look up, looks them up, and remembers absences."""

    def __init__(
        self,
        *,
        cache: RegistryCache,
        fetch: Fetch,
        metrics: IngestMetrics,
        max_ids: int,
        absent_ttl_s: float,
        timeout_s: float,
        max_absent: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = cache
        self._fetch = fetch
        self._metrics = metrics
        self.max_ids = max_ids
        self._absent_ttl_s = absent_ttl_s
        self._timeout_s = timeout_s
        self._max_absent = max_absent
        self._clock = clock
        self._absent: dict[str, float] = {}  # device id -> monotonic time the entry expires
        self._paused_until = 0.0
        self._next_prune = 0.0
        self._negative_hits = metrics.registry_negative_hits
        self._skipped_cap = metrics.registry_lookup_skipped.labels("cap")
        self._skipped_full = metrics.registry_lookup_skipped.labels("negative_cache_full")
        self._skipped_error = metrics.registry_lookup_skipped.labels("after_error")

    def wants(self, device_id: str, already: int) -> bool:
        """Should this miss be held for a lookup? `already`: distinct ids held this turn."""
        if self._cache.knows(device_id):
            return False  # known and disabled (or another kind): the cache's answer stands
        now = self._clock()
        expires = self._absent.get(device_id)
        if expires is not None:
            if expires > now:
                self._negative_hits.inc()
                return False
            del self._absent[device_id]
        if now < self._paused_until:
            self._skipped_error.inc()
            return False
        if already >= self.max_ids:
            self._skipped_cap.inc()
            return False
        if len(self._absent) >= self._max_absent and not self._prune(now):
            self._skipped_full.inc()
            return False
        return True

    async def resolve(self, device_ids: Sequence[str]) -> int:
        """Look the ids up in one query, put found rows in the cache; returns how many found."""
        if not device_ids:
            return 0
        metrics = self._metrics
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                rows = await self._fetch(device_ids)
        except Exception as exc:  # any failure: dead-letter as before, never stop the loop
            self._paused_until = self._clock() + self._absent_ttl_s
            metrics.registry_lookups.labels("error").inc()
            log.warning(
                "registry lookup failed: %s",
                exc,
                extra={"devices": len(device_ids), "paused_s": self._absent_ttl_s},
            )
            return 0
        finished = self._clock()
        metrics.registry_lookups.labels("ok").inc()
        metrics.registry_lookup_latency.observe(finished - started)
        found = set()
        for row in rows:
            found.add(row.device_id)
            self._cache.upsert(row)
        expires = finished + self._absent_ttl_s
        for device_id in device_ids:
            if device_id not in found:
                self._absent[device_id] = expires
        metrics.registry_lookup_devices.labels("found").inc(len(found))
        metrics.registry_lookup_devices.labels("absent").inc(len(device_ids) - len(found))
        if found:
            log.info(
                "registry lookup found devices",
                extra={"found": len(found), "looked_up": len(device_ids)},
            )
        return len(found)

    def _prune(self, now: float) -> bool:
        """Drop expired absences (at most once a second); True if there is room afterwards."""
        if now >= self._next_prune:
            self._next_prune = now + min(1.0, self._absent_ttl_s)
            self._absent = {k: v for k, v in self._absent.items() if v > now}
        return len(self._absent) < self._max_absent
