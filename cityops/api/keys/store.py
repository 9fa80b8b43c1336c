"""SQL of API keys: only SHA-256 hashes are stored."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from cityops.api.db import Executor


async def find_key(conn: Executor, *, key_hash: bytes) -> asyncpg.Record | None:
    """The unrevoked key with this hash, or None."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT name, scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return row


async def create_key(
    conn: Executor, *, name: str, key_hash: bytes, scopes: list[str]
) -> asyncpg.Record | None:
    """Insert a key; None when the name is taken."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        INSERT INTO api_keys (name, key_hash, scopes) VALUES ($1, $2, $3::text[])
        ON CONFLICT (name) DO NOTHING
        RETURNING name, scopes, created_at, revoked_at, last_used_at
        """,
        name,
        key_hash,
        scopes,
    )
    return row


async def list_keys(conn: Executor) -> list[asyncpg.Record]:
    """Every key's public facts."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT name, scopes, created_at, revoked_at, last_used_at FROM api_keys ORDER BY name"
    )
    return rows


async def revoke_key(conn: Executor, *, name: str) -> bool:
    """Revoke a key by name; returns whether it existed."""
    status = await conn.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE name = $1", name
    )
    return status != "UPDATE 0"


async def record_key_use(
    conn: Executor, *, key_hashes: list[bytes], used_at: list[datetime], timeout_s: float
) -> int:
    """Move each key's last_used_at forward to its use time (never back); returns rows changed."""
    status = await conn.execute(
        """
        UPDATE api_keys AS k SET last_used_at = greatest(k.last_used_at, u.used_at)
        FROM unnest($1::bytea[], $2::timestamptz[]) AS u (key_hash, used_at)
        WHERE k.key_hash = u.key_hash
          AND (k.last_used_at IS NULL OR k.last_used_at < u.used_at)
        """,
        key_hashes,
        used_at,
        timeout=timeout_s,
    )
    return int(status.split()[-1])
