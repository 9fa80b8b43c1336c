"""The registry cache's versioned changes, devices-topic records, and the miss lookup's bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from prometheus_client import CollectorRegistry

from cityops.common.kinds import Kind
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.registry_cache import RegistryCache
from cityops.ingest.registry_follow import (
    InvalidRecordError,
    apply_change,
    parse_device_record,
)
from cityops.ingest.registry_lookup import DeviceRow, MissResolver

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def row(device_id: str, *, at: int, enabled: bool = True, kind: Kind = Kind.PARKING) -> DeviceRow:
    return DeviceRow(device_id, kind, enabled, T0 + timedelta(seconds=at))


def document(device_id: str, *, enabled: bool = True, kind: str = "parking") -> bytes:
    """The API's device document (cityops/api/outbox/relay.py device_document)."""
    return orjson.dumps(
        {
            "device_id": device_id,
            "kind": kind,
            "district": "north",
            "zone": None,
            "lat": 52.5,
            "lon": 13.4,
            "reporting_interval_s": 60,
            "metadata": {"vendor": "acme"},
            "enabled": enabled,
            "updated_at": (T0 + timedelta(seconds=5)).isoformat(),
        }
    )


# ---- RegistryCache ------------------------------------------------------------------------


def test_an_older_row_never_overwrites_a_newer_one() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=10)])
    assert not cache.upsert(row("pk-1", at=5, enabled=False))
    assert cache.kind_of("pk-1") is Kind.PARKING
    assert cache.upsert(row("pk-1", at=20, enabled=False))
    assert cache.kind_of("pk-1") is None
    assert cache.knows("pk-1")  # disabled, but known: no lookup for it


def test_a_deleted_device_is_not_brought_back_by_its_old_row() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=10)])
    assert cache.forget("pk-1")
    assert not cache.knows("pk-1")
    assert not cache.upsert(row("pk-1", at=10))  # a query that read it just before the delete
    assert cache.kind_of("pk-1") is None
    assert cache.upsert(row("pk-1", at=30))  # provisioned again
    assert cache.kind_of("pk-1") is Kind.PARKING


def test_changes_during_a_snapshot_are_replayed_onto_it() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=1), row("pk-2", at=1)])
    cache.begin_snapshot()
    cache.upsert(row("pk-new", at=50))  # committed after the snapshot's read started
    cache.forget("pk-2")
    cache.upsert(row("pk-1", at=0, enabled=False))  # stale: the snapshot has a newer row
    cache.replace([row("pk-1", at=1), row("pk-2", at=1)])  # the snapshot as it was read
    assert cache.kind_of("pk-new") is Kind.PARKING
    assert cache.kind_of("pk-2") is None
    assert cache.kind_of("pk-1") is Kind.PARKING
    cache.upsert(row("pk-3", at=60))  # no snapshot in flight: nothing journaled, applied once
    cache.replace([])
    assert cache.kind_of("pk-3") is None


def test_only_postgresql_rows_move_the_refresh_mark() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=1)])
    cache.upsert(row("pk-2", at=100))  # from the topic: must not make the refresh skip ahead
    assert cache.high_water == T0 + timedelta(seconds=1)
    assert cache.apply([row("pk-3", at=40)]) == 1
    assert cache.high_water == T0 + timedelta(seconds=40)


# ---- devices-topic records ----------------------------------------------------------------


def test_a_device_document_becomes_a_change() -> None:
    change = parse_device_record(b"pk-1", document("pk-1", enabled=False))
    assert change.device_id == "pk-1"
    assert change.row == DeviceRow("pk-1", Kind.PARKING, False, T0 + timedelta(seconds=5))


def test_a_tombstone_deletes() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=1)])
    change = parse_device_record(b"pk-1", None)
    assert change.row is None
    assert apply_change(cache, change) == "deleted"
    assert cache.kind_of("pk-1") is None


def test_outcomes_of_applying_changes() -> None:
    cache = RegistryCache()
    cache.replace([row("pk-1", at=100)])
    assert apply_change(cache, parse_device_record(b"pk-1", document("pk-1"))) == "stale"
    assert apply_change(cache, parse_device_record(b"pk-2", document("pk-2"))) == "applied"
    assert cache.kind_of("pk-2") is Kind.PARKING


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (None, document("pk-1")),
        (b"\xff\xfe", document("pk-1")),
        (b"not a device id!", document("pk-1")),
        (b"pk-2", document("pk-1")),  # key and document disagree
        (b"pk-1", b"{not json"),
        (b"pk-1", document("pk-1", kind="lamppost")),
        (b"pk-1", orjson.dumps({"device_id": "pk-1", "kind": "parking"})),  # no enabled
        (b"pk-1", b'{"device_id":"pk-1","kind":"parking","enabled":true,"x":"' + b"a" * 300_000),
    ],
)
def test_unusable_records_are_refused(key: bytes | None, value: bytes) -> None:
    with pytest.raises(InvalidRecordError):
        parse_device_record(key, value)


# ---- MissResolver -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDatabase:
    def __init__(self, rows: Sequence[DeviceRow] = ()) -> None:
        self.rows = {r.device_id: r for r in rows}
        self.queries: list[list[str]] = []
        self.fail: BaseException | None = None

    async def __call__(self, device_ids: Sequence[str]) -> list[DeviceRow]:
        self.queries.append(list(device_ids))
        if self.fail is not None:
            raise self.fail
        return [self.rows[d] for d in device_ids if d in self.rows]


def resolver_with(
    database: FakeDatabase, *, max_ids: int = 10, max_absent: int = 1000
) -> tuple[MissResolver, RegistryCache, Clock, IngestMetrics]:
    cache = RegistryCache()
    cache.replace([row("pk-known", at=1, enabled=False)])
    clock = Clock()
    metrics = IngestMetrics.create(CollectorRegistry())
    resolver = MissResolver(
        cache=cache,
        fetch=database,
        metrics=metrics,
        max_ids=max_ids,
        absent_ttl_s=5.0,
        timeout_s=1.0,
        max_absent=max_absent,
        clock=clock,
    )
    return resolver, cache, clock, metrics


async def test_a_found_device_enters_the_cache() -> None:
    database = FakeDatabase([row("pk-new", at=3)])
    resolver, cache, _, metrics = resolver_with(database)
    assert resolver.wants("pk-new", 0)
    assert await resolver.resolve(["pk-new"]) == 1
    assert cache.kind_of("pk-new") is Kind.PARKING
    assert metrics.registry_lookup_devices.labels("found")._value.get() == 1


async def test_an_absent_id_costs_one_query_per_interval() -> None:
    database = FakeDatabase()
    resolver, _, clock, metrics = resolver_with(database)
    assert resolver.wants("bogus", 0)
    assert await resolver.resolve(["bogus"]) == 0
    for _ in range(100):
        assert not resolver.wants("bogus", 0)
    assert metrics.registry_negative_hits._value.get() == 100
    clock.now += 5.1
    assert resolver.wants("bogus", 0)  # the interval passed: PostgreSQL may know it now
    assert len(database.queries) == 1


def test_a_known_disabled_device_is_not_looked_up() -> None:
    resolver, _, _, _ = resolver_with(FakeDatabase())
    assert not resolver.wants("pk-known", 0)


def test_at_most_max_ids_per_lookup() -> None:
    resolver, _, _, metrics = resolver_with(FakeDatabase(), max_ids=3)
    assert [resolver.wants(f"x-{i}", i) for i in range(5)] == [True, True, True, False, False]
    assert metrics.registry_lookup_skipped.labels("cap")._value.get() == 2


async def test_a_full_negative_cache_stops_new_lookups_until_entries_expire() -> None:
    database = FakeDatabase()
    resolver, _, clock, metrics = resolver_with(database, max_absent=2)
    await resolver.resolve(["b-1", "b-2"])
    assert not resolver.wants("b-3", 0)
    assert metrics.registry_lookup_skipped.labels("negative_cache_full")._value.get() == 1
    clock.now += 6
    assert resolver.wants("b-3", 0)


async def test_a_failed_lookup_pauses_lookups_for_an_interval() -> None:
    database = FakeDatabase()
    database.fail = OSError("connection refused")
    resolver, _, clock, metrics = resolver_with(database)
    assert await resolver.resolve(["pk-1"]) == 0
    assert metrics.registry_lookups.labels("error")._value.get() == 1
    assert not resolver.wants("pk-1", 0)
    clock.now += 5.1
    assert resolver.wants("pk-1", 0)


async def test_a_slow_lookup_is_cut_off_by_its_timeout() -> None:
    class Slow(FakeDatabase):
        async def __call__(self, device_ids: Sequence[str]) -> list[DeviceRow]:
            await asyncio.sleep(30)
            return []

    cache = RegistryCache()
    cache.replace([])
    metrics = IngestMetrics.create(CollectorRegistry())
    resolver = MissResolver(
        cache=cache, fetch=Slow(), metrics=metrics, max_ids=10, absent_ttl_s=5, timeout_s=0.05
    )
    assert await asyncio.wait_for(resolver.resolve(["pk-1"]), timeout=2) == 0
    assert metrics.registry_lookups.labels("error")._value.get() == 1
