"""When each API key was last used: remembered in memory, written in one statement per flush.

A write per request would turn every read into a row update (and a dead tuple) of `api_keys`.
Instead the authenticator calls `KeyUsage.record()` (a dict assignment) and a background task
writes the keys used since the last flush every `CITYOPS_API_KEY_USAGE_FLUSH_S`, in one
`UPDATE ... FROM unnest(...)`; the exit of `run_key_usage()` flushes once more, after the HTTP
server has stopped, so a graceful shutdown loses nothing. `last_used_at` only moves forward
(`greatest()`), whichever replica flushes last. A failed flush keeps its keys for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from cityops.api.keys import store as store_keys

log = logging.getLogger(__name__)

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class KeyUsage:
    """The last-use time of each key used since the last flush, keyed by the key's hash."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        flush_s: float,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.flush_s = flush_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._pending: dict[bytes, float] = {}
        self._flushes = Counter(
            "cityops_api_key_usage_flushes_total",
            "Writes of API keys' last_used_at, by outcome (ok, error).",
            ["outcome"],
            registry=registry,
        )
        self._keys_written = Counter(
            "cityops_api_key_usage_keys_written_total",
            "API key rows whose last_used_at a flush moved forward.",
            registry=registry,
        )
        for outcome in ("ok", "error"):
            self._flushes.labels(outcome)

    def record(self, key_hash: bytes) -> None:
        """Note that the key with this hash was used now (no I/O)."""
        self._pending[key_hash] = self._clock()

    @property
    def pending(self) -> int:
        """Keys used since the last successful flush."""
        return len(self._pending)

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Write the pending uses in one statement; returns rows moved, 0 when nothing pends.

        On a database error the uses are kept (newest time wins) for the next flush.
        """
        if not self._pending:
            return 0
        taken, self._pending = self._pending, {}
        try:
            written = await store_keys.record_key_use(
                pool,
                key_hashes=list(taken),
                used_at=[datetime.fromtimestamp(at, UTC) for at in taken.values()],
                timeout_s=self.timeout_s,
            )
        except _DB_ERRORS as exc:
            for key_hash, at in taken.items():
                if at > self._pending.get(key_hash, 0.0):
                    self._pending[key_hash] = at
            self._flushes.labels("error").inc()
            log.warning(
                "api key usage flush failed: %s",
                exc,
                extra={"keys": len(taken), "error": type(exc).__name__},
            )
            raise
        self._flushes.labels("ok").inc()
        self._keys_written.inc(written)
        log.debug("api key usage flushed", extra={"keys": len(taken), "written": written})
        return written

    async def flush_every(self, pool: asyncpg.Pool, *, stop: asyncio.Event) -> None:
        """Flush every `flush_s` until `stop` is set (the final flush is the caller's)."""
        while not stop.is_set():
            # a timer, not a poll: wake at the next flush time or as soon as stop is set
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.flush_s)
            if stop.is_set():
                return
            with contextlib.suppress(*_DB_ERRORS):  # counted and logged by flush()
                await self.flush(pool)


@contextlib.asynccontextmanager
async def run_key_usage(pool: asyncpg.Pool, usage: KeyUsage) -> AsyncIterator[KeyUsage]:
    """Flush `usage` in the background; on exit stop the timer and flush what is left."""
    stop = asyncio.Event()
    task = asyncio.create_task(usage.flush_every(pool, stop=stop), name="key-usage-flush")
    try:
        yield usage
    finally:
        stop.set()
        await task
        with contextlib.suppress(*_DB_ERRORS):  # counted and logged by flush()
            await usage.flush(pool)
