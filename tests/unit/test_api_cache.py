"""The TTL cache: values expire, concurrent misses compute once, errors are not cached."""

from __future__ import annotations

import asyncio

import pytest

from cityops.api.http.cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_expired_values_are_served_while_one_refresh_runs() -> None:
    clock = Clock()
    cache: TtlCache[int] = TtlCache(ttl_s=5, clock=clock)
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await cache.get("a", compute) == 1
    assert await cache.get("a", compute) == 1
    assert await cache.get("b", compute) == 2
    clock.now = 6
    assert await cache.get("a", compute) == 1  # stale, answered at once
    assert await cache.get("a", compute) == 1  # one refresh only
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls == 3
    assert await cache.get("a", compute) == 3  # refreshed


async def test_a_failed_refresh_keeps_the_stale_value() -> None:
    clock = Clock()
    cache: TtlCache[int] = TtlCache(ttl_s=5, clock=clock)

    async def first() -> int:
        return 1

    async def broken() -> int:
        raise RuntimeError("db down")

    assert await cache.get("a", first) == 1
    clock.now = 6
    assert await cache.get("a", broken) == 1
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await cache.get("a", first) == 1  # still stale: the next call refreshes again
    await asyncio.sleep(0)
    clock.now = 7
    assert await cache.get("a", first) == 1


async def test_concurrent_misses_share_one_computation() -> None:
    cache: TtlCache[str] = TtlCache(ttl_s=5)
    started = 0
    release = asyncio.Event()

    async def slow() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "kpis"

    waiters = [asyncio.create_task(cache.get("d1", slow)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == ["kpis"] * 10
    assert started == 1


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    cache: TtlCache[int] = TtlCache(ttl_s=5)
    release = asyncio.Event()

    async def broken() -> int:
        await release.wait()
        raise RuntimeError("db down")

    waiters = [asyncio.create_task(cache.get("d1", broken)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def fine() -> int:
        return 7

    assert await cache.get("d1", fine) == 7


async def test_zero_ttl_disables_caching() -> None:
    cache: TtlCache[int] = TtlCache(ttl_s=0)
    values = iter([1, 2])

    async def compute() -> int:
        return next(values)

    assert [await cache.get("a", compute), await cache.get("a", compute)] == [1, 2]
    with pytest.raises(StopIteration):
        next(values)
