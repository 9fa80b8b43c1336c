"""Connect to a test database as Grafana's read-only role `cityops_grafana`.

The native stack's `cityops` role may not create roles, so when the stack has not created the
reader (no CITYOPS_GRAFANA_DATABASE_URL in .stack/cityops.env) the stack's superuser creates it
NOLOGIN once, and tests reach it with `SET ROLE` (privileges are then exactly the reader's).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from cityops.stack.credentials import load_or_create_secrets, superuser_url
from cityops.stack.layout import StackPaths, repo_root

READER = "cityops_grafana"


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def ensure_reader_role(stack_env: Mapping[str, str], database_url: str) -> None:
    """Make sure the reader role exists and holds its grants in `database_url`'s database."""
    if "CITYOPS_GRAFANA_DATABASE_URL" not in stack_env:
        secrets = load_or_create_secrets(StackPaths(repo=repo_root()))
        admin = await asyncpg.connect(superuser_url(secrets))
        try:
            exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", READER)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateObjectError):  # a concurrent test won
                    await admin.execute(f"CREATE ROLE {READER} NOLOGIN")
                    await admin.execute(
                        f"ALTER ROLE {READER} SET default_transaction_read_only = on"
                    )
        finally:
            await admin.close()
    owner = await asyncpg.connect(database_url)
    try:
        # the template may have been migrated before the role existed
        assert await owner.fetchval("SELECT ops.grant_reader()") is True
    finally:
        await owner.close()


@contextlib.asynccontextmanager
async def reader_connection(
    stack_env: Mapping[str, str], database_url: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose current role is the read-only reader, on the test database."""
    await ensure_reader_role(stack_env, database_url)
    database = urlsplit(database_url).path.lstrip("/")
    login = stack_env.get("CITYOPS_GRAFANA_DATABASE_URL")
    if login:
        conn = await asyncpg.connect(with_database(login, database))
    else:
        secrets = load_or_create_secrets(StackPaths(repo=repo_root()))
        conn = await asyncpg.connect(with_database(superuser_url(secrets), database))
        await conn.execute(f"SET ROLE {READER}")
        await conn.execute("SET default_transaction_read_only = on")
    try:
        assert await conn.fetchval("SELECT current_user") == READER
        yield conn
    finally:
        await conn.close()
