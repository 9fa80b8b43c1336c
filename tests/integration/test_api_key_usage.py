"""API keys' last_used_at: recorded in memory, flushed on a timer and at shutdown, never back."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from cityops.api.http.auth import hash_api_key
from cityops.api.keys.usage import KeyUsage
from tests.helpers import wait_for
from tests.integration.api_support import ApiCase, RunningApi, run_api

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _create_keys(api: RunningApi, *names: str) -> dict[str, str]:
    keys = {}
    async with api.client() as admin:
        for name in names:
            response = await admin.post("/v1/api-keys", json={"name": name, "scopes": ["read"]})
            assert response.status_code == 201, response.text
            assert response.json()["last_used_at"] is None
            keys[name] = response.json()["key"]
    return keys


async def _last_used(api: RunningApi) -> dict[str, datetime | None]:
    async with api.client() as admin:
        response = await admin.get("/v1/api-keys")
    assert response.status_code == 200, response.text
    return {
        item["name"]: datetime.fromisoformat(item["last_used_at"]) if item["last_used_at"] else None
        for item in response.json()["items"]
    }


def _flushes(api: RunningApi, outcome: str) -> float:
    value = api.registry.get_sample_value(
        "cityops_api_key_usage_flushes_total", {"outcome": outcome}
    )
    assert value is not None
    return value


async def test_used_key_gets_last_used_at_and_an_unused_key_stays_null(api_case: ApiCase) -> None:
    settings = api_case.settings(
        api_projector_enabled=False,
        api_key_usage_flush_s=0.2,
    )
    async with run_api(settings) as api:
        keys = await _create_keys(api, "used", "idle")
        assert await _last_used(api) == {"used": None, "idle": None}

        async with api.client(keys["used"]) as client:
            database_now = await api.context.pool.fetchval("SELECT now()")
            assert (await client.get("/v1/devices")).status_code == 200

            async def first_use_flushed() -> datetime | None:
                return (await _last_used(api))["used"]

            first = await wait_for(first_use_flushed, timeout=10, message="last_used_at set")
            # the time of the request (this machine's clock), not of the flush
            assert abs(first - database_now) < timedelta(seconds=5)
            assert (await _last_used(api))["idle"] is None
            assert _flushes(api, "ok") >= 1
            assert api.registry.get_sample_value("cityops_api_key_usage_keys_written_total") == 1

            await asyncio.sleep(0.01)
            assert (await client.get("/v1/tickets")).status_code == 200

            async def moved_forward() -> bool:
                used = (await _last_used(api))["used"]
                return used is not None and used > first

            await wait_for(moved_forward, timeout=10, message="last_used_at moved forward")
        written = api.registry.get_sample_value("cityops_api_key_usage_keys_written_total")
        assert written == 2
        assert (await _last_used(api))["idle"] is None
        assert _flushes(api, "error") == 0


async def test_an_older_use_never_moves_last_used_at_back(api_case: ApiCase) -> None:
    settings = api_case.settings(
        api_projector_enabled=False,
        api_key_usage_flush_s=0.2,
    )
    async with run_api(settings) as api:
        keys = await _create_keys(api, "shared")
        async with api.client(keys["shared"]) as client:
            assert (await client.get("/v1/devices")).status_code == 200

        async def flushed() -> datetime | None:
            return (await _last_used(api))["shared"]

        newest = await wait_for(flushed, timeout=10, message="last_used_at set")
        # another replica whose last use of the key is an hour older flushes afterwards
        other = KeyUsage(
            registry=CollectorRegistry(),
            flush_s=3600,
            clock=lambda: newest.timestamp() - 3600,
        )
        other.record(hash_api_key(keys["shared"]))
        assert await other.flush(api.context.pool) == 0
        assert (await _last_used(api))["shared"] == newest


async def test_graceful_shutdown_flushes_uses_not_yet_written(
    api_case: ApiCase, database_url: str
) -> None:
    settings = api_case.settings(
        api_projector_enabled=False,
        api_key_usage_flush_s=3600,  # the timer never fires during this test
    )
    async with run_api(settings) as api:
        keys = await _create_keys(api, "late", "idle")
        async with api.client(keys["late"]) as client:
            assert (await client.get("/v1/devices")).status_code == 200
        assert (await _last_used(api))["late"] is None  # not flushed yet
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT name, last_used_at FROM api_keys ORDER BY name")
    finally:
        await conn.close()
    by_name = {row["name"]: row["last_used_at"] for row in rows}
    assert by_name["late"] is not None
    assert by_name["idle"] is None


async def test_a_failed_flush_keeps_the_uses_for_the_next_one(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO api_keys (name, key_hash, scopes) VALUES ('k', $1, '{read}')",
            hash_api_key("cok_k"),
        )
    finally:
        await conn.close()
    registry = CollectorRegistry()
    usage = KeyUsage(registry=registry, flush_s=3600)
    usage.record(hash_api_key("cok_k"))

    closed = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    await closed.close()
    with pytest.raises(asyncpg.InterfaceError):
        await usage.flush(closed)
    assert usage.pending == 1
    assert registry.get_sample_value("cityops_api_key_usage_flushes_total", {"outcome": "error"})

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await usage.flush(pool) == 1
        assert usage.pending == 0
        assert await pool.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'k'")
        assert await usage.flush(pool) == 0  # nothing pending, no statement
    finally:
        await pool.close()
