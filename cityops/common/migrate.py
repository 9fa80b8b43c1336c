"""Ordered SQL migrations, applied once each and tracked in `schema_migrations`.

`cityops migrate` runs them before the services start; it is safe to run twice and from
several replicas at once (an advisory lock serialises them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg
from pydantic import SecretStr

from cityops.common.service import ServiceParser, entry_point, load_settings, start_logging
from cityops.common.settings import DatabaseSettings

log = logging.getLogger(__name__)

# An arbitrary, fixed key: "cityops" in ASCII.
_LOCK_KEY = 0x636974796F7073
GRAFANA_ROLE = "cityops_grafana"


class MigrateSettings(DatabaseSettings):
    """`cityops migrate`: the database, and optionally the Grafana reader's login password."""

    grafana_db_password: SecretStr | None = None


class MigrationError(RuntimeError):
    """An applied migration was edited, or a migration failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text; an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The packaged migrations in name order."""
    folder = resources.files("cityops.common") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(entry.name, entry.read_text(encoding="utf-8")) for entry in files]


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply every pending migration, each in its own transaction; return the applied names."""
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            name       text PRIMARY KEY,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        applied = {
            row["name"]: row["checksum"]
            for row in await conn.fetch("SELECT name, checksum FROM schema_migrations")
        }
        done: list[str] = []
        for migration in load_migrations():
            if migration.name in applied:
                if applied[migration.name] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was edited after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration", extra={"migration": migration.name})
            done.append(migration.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def ensure_grafana_login(conn: asyncpg.Connection, *, password: str) -> None:
    """Give the read-only `cityops_grafana` role a login with `password` (needs CREATEROLE).

    The role may read the `ops` views only (migration 0300); dashboards connect with it.
    """
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", GRAFANA_ROLE)
    # DDL takes no bind parameters: let the server quote the password literal.
    literal = await conn.fetchval("SELECT quote_literal($1::text)", password)
    verb = "ALTER" if exists else "CREATE"
    await conn.execute(f"{verb} ROLE {GRAFANA_ROLE} LOGIN PASSWORD {literal}")
    await conn.execute(f"ALTER ROLE {GRAFANA_ROLE} SET default_transaction_read_only = on")
    await conn.execute(f"ALTER ROLE {GRAFANA_ROLE} SET statement_timeout = '15s'")
    if await conn.fetchval("SELECT to_regprocedure('ops.grant_reader(name)') IS NOT NULL"):
        await conn.execute("SELECT ops.grant_reader($1)", GRAFANA_ROLE)


async def _run(settings: MigrateSettings) -> int:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        done = await apply_migrations(conn)
        if settings.grafana_db_password is not None:
            await ensure_grafana_login(
                conn, password=settings.grafana_db_password.get_secret_value()
            )
    except (MigrationError, asyncpg.PostgresError) as exc:
        log.error("migration failed: %s", exc)  # noqa: TRY400 - the message is the whole story
        return 1
    finally:
        await conn.close()
    log.info("migrations up to date", extra={"applied": done})
    return 0


@entry_point("cityops migrate")
def main(argv: list[str]) -> int:
    """`cityops migrate`: apply pending migrations to CITYOPS_DATABASE_URL."""
    parser = ServiceParser(prog="cityops migrate", description=__doc__)
    parser.parse_args(argv)
    settings = load_settings(MigrateSettings)
    start_logging("migrate", settings)
    return asyncio.run(_run(settings))
