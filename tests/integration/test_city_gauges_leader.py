"""One API replica at a time refreshes and exports the city gauges (advisory-lock election)."""

from __future__ import annotations

import contextlib
import functools

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from cityops.common.city_metrics import REFRESHER_LOCK, CityMetrics, run_city_metrics
from tests.helpers import wait_for
from tests.integration.test_city_metrics import seed_city

pytestmark = pytest.mark.postgres

BINS_FULL = ("cityops_city_bins_full", {"district": "south"})


def _refresher(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("cityops_city_refresher")


def _bins_full(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(*BINS_FULL)


async def _lock_holders(conn: asyncpg.Connection) -> list[int]:
    """Backend pids holding REFRESHER_LOCK in this database."""
    rows = await conn.fetch(
        """
        SELECT pid FROM pg_locks
        WHERE locktype = 'advisory' AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((classid::bigint << 32) | objid::bigint) = $1
        """,
        REFRESHER_LOCK,
    )
    return [row["pid"] for row in rows]


async def _one_refresher(replicas: dict[str, tuple[CollectorRegistry, CityMetrics]]) -> str:
    """The name of the one replica exporting the city gauges (asserting the others export none)."""
    refreshers = [name for name, (registry, _) in replicas.items() if _refresher(registry) == 1]
    assert len(refreshers) == 1, refreshers
    (name,) = refreshers
    registry, metrics = replicas[name]
    assert metrics.is_refresher()
    assert _bins_full(registry) == 1
    for other, (other_registry, other_metrics) in replicas.items():
        if other != name:
            assert _refresher(other_registry) == 0
            assert not other_metrics.is_refresher()
            assert _bins_full(other_registry) is None
            assert other_registry.get_sample_value("cityops_city_refresh_timestamp_seconds") is None
    # what dashboards compute: the sum over replicas is the city's value
    assert sum(_bins_full(registry) or 0 for registry, _ in replicas.values()) == 1
    return name


async def test_exactly_one_replica_exports_and_the_other_takes_over_when_it_stops(
    database_url: str,
) -> None:
    observer = await asyncpg.connect(database_url)
    try:
        await seed_city(observer)
        connect = functools.partial(asyncpg.connect, database_url)
        replicas: dict[str, tuple[CollectorRegistry, CityMetrics]] = {}
        stacks: dict[str, contextlib.AsyncExitStack] = {}
        async with contextlib.AsyncExitStack() as outer:
            for name in ("a", "b"):
                stacks[name] = await outer.enter_async_context(contextlib.AsyncExitStack())
                registry = CollectorRegistry()
                metrics = await stacks[name].enter_async_context(
                    run_city_metrics(connect, registry=registry, interval_s=1.0, timeout_s=5.0)
                )
                replicas[name] = (registry, metrics)

            first = await wait_for(
                lambda: _one_refresher(replicas), timeout=10, message="one refresher"
            )
            # ticks later it is still exactly one, and only its session holds the lock
            refreshed = replicas[first][1].snapshot
            assert refreshed is not None
            await wait_for(
                lambda: (replicas[first][1].snapshot or refreshed).taken_at > refreshed.taken_at,
                timeout=5,
                message="a second refresh",
            )
            assert len(await _lock_holders(observer)) == 1
            assert await _one_refresher(replicas) == first

            await stacks[first].aclose()  # graceful stop: its session closes, the lock goes
            del replicas[first]
            (second,) = replicas
            assert (
                await wait_for(
                    lambda: _one_refresher(replicas), timeout=10, message="the other takes over"
                )
                == second
            )
            assert len(await _lock_holders(observer)) == 1
    finally:
        await observer.close()


async def test_a_killed_refresher_session_stops_exporting_and_the_lock_moves(
    database_url: str,
) -> None:
    observer = await asyncpg.connect(database_url)
    try:
        await seed_city(observer)
        connect = functools.partial(asyncpg.connect, database_url)
        replicas: dict[str, tuple[CollectorRegistry, CityMetrics]] = {}
        async with contextlib.AsyncExitStack() as stack:
            for name in ("a", "b"):
                registry = CollectorRegistry()
                # ticks 4 s apart: the old refresher must stop exporting before its next tick
                metrics = await stack.enter_async_context(
                    run_city_metrics(connect, registry=registry, interval_s=4.0, timeout_s=5.0)
                )
                replicas[name] = (registry, metrics)
            first = await wait_for(
                lambda: _one_refresher(replicas), timeout=10, message="one refresher"
            )
            (holder,) = await _lock_holders(observer)
            # as if the replica's host died: PostgreSQL ends its session, releasing the lock
            assert await observer.fetchval("SELECT pg_terminate_backend($1)", holder)
            await wait_for(
                lambda: _refresher(replicas[first][0]) == 0,
                timeout=1,
                message="the old refresher notices its session is gone",
            )
            assert _bins_full(replicas[first][0]) is None

            async def new_holder() -> bool:
                holders = await _lock_holders(observer)
                return len(holders) == 1 and holders[0] != holder

            await wait_for(new_holder, timeout=10, message="the lock has a new holder")
            await wait_for(lambda: _one_refresher(replicas), timeout=10, message="one refresher")
    finally:
        await observer.close()
