"""drop_database: FORCE ends our own sessions; odd names are quoted; a missing one is fine."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from cityops.common.scratch import drop_database, quote_ident

pytestmark = [pytest.mark.postgres]


async def test_drop_ends_open_sessions_and_quotes_the_name(stack_env: Mapping[str, str]) -> None:
    url = stack_env["CITYOPS_DATABASE_URL"]
    name = f'scratch "{uuid.uuid4().hex[:8]}"; x'
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        other = await asyncpg.connect(urlunsplit(urlsplit(url)._replace(path=f"/{name}")))
        assert await drop_database(admin, name) is True
        assert other.is_closed() or not await _alive(other)
        exists = await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        assert exists == 0
        assert await drop_database(admin, name) is True  # already gone: IF EXISTS
    finally:
        await admin.close()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True
