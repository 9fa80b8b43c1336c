"""A small time-to-live cache: single flight, and stale values served while refreshing.

Concurrent misses share one computation. Once a key has a value, an expired value is still
answered at once while one background task recomputes it, so only the very first request
for a key ever waits for the computation (stale-while-revalidate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class TtlCache(Generic[T]):
    """Values fresh for `ttl_s` seconds; see the module docstring."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_entries: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._values: dict[Hashable, tuple[float, T]] = {}
        self._pending: dict[Hashable, asyncio.Future[T]] = {}
        self._refreshes: dict[Hashable, asyncio.Task[None]] = {}

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T:
        """The value of `key`: fresh, stale while a refresh runs, or computed (once) now."""
        if self._ttl_s <= 0:
            return await compute()
        cached = self._values.get(key)
        if cached is not None:
            if cached[0] <= self._clock() and key not in self._refreshes:
                self._start_refresh(key, compute)
            return cached[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        return await self._compute(key, compute)

    def _start_refresh(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> None:
        async def refresh() -> None:
            try:
                await self._compute(key, compute)
            except Exception as exc:
                log.warning("cache refresh failed, serving the previous value: %s", exc)

        # Registered before it runs, so the next caller does not start a second one.
        task = asyncio.create_task(refresh())
        self._refreshes[key] = task
        task.add_done_callback(lambda _: self._refreshes.pop(key, None))

    async def _compute(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(value)
            if len(self._values) >= self._max_entries and key not in self._values:
                self._values.clear()
            self._values[key] = (self._clock() + self._ttl_s, value)
            return value
        finally:
            del self._pending[key]
