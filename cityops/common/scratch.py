"""Dropping the throw-away databases of benchmarks and tests.

`DROP DATABASE … WITH (FORCE)` ends the other sessions on the database, but only those the
caller may signal: an autovacuum worker that started on the freshly filled database (after a
benchmark wrote a few hundred thousand readings, it usually has) is refused with
"must be a member of the role whose process is being terminated". It ends on its own within
moments, so the drop is retried instead of failing the run that measured something.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def drop_database(
    admin: asyncpg.Connection, name: str, *, attempts: int = 20, delay_s: float = 0.5
) -> bool:
    """Drop database `name` if it exists; False (logged) if it still could not be dropped."""
    for attempt in range(1, attempts + 1):
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError) as exc:
            if attempt == attempts:
                log.warning("could not drop database %s: %s", name, exc)
                return False
            await asyncio.sleep(delay_s)
        else:
            return True
    return False
