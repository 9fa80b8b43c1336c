"""PostgreSQL: our own cluster under `.stack/postgres`, run as user `postgres`."""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

import asyncpg

from cityops.common.migrate import ensure_grafana_login
from cityops.stack.credentials import DB_NAME, DB_ROLE, StackSecrets, superuser_url
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, run_command, write_if_changed

PORT = 5432
SERVICE_USER = "postgres"
# Unix socket paths are limited to 107 bytes (sun_path); longer checkouts go TCP-only.
_MAX_SOCKET_DIR = 90

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "port": str(PORT),
    "max_connections": "200",
    # modest for 2 cores: the page cache does the rest
    "shared_buffers": "'256MB'",
    "effective_cache_size": "'2GB'",
    "work_mem": "'8MB'",
    "maintenance_work_mem": "'128MB'",
    "synchronous_commit": "on",
    "wal_compression": "on",
    "max_wal_size": "'2GB'",
    "checkpoint_completion_target": "0.9",
    "max_worker_processes": "4",
    "max_parallel_workers": "2",
    "max_parallel_workers_per_gather": "1",
    "log_min_duration_statement": "'1s'",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "timezone": "'UTC'",
}


def _bin_dir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise StackError("PostgreSQL server binaries not found under /usr/lib/postgresql")
    return candidates[-1].parent


class PostgresLayout:
    """Paths under `.stack/postgres` (owned by `postgres`: it refuses to run as root)."""

    def __init__(self, paths: StackPaths) -> None:
        self.home = paths.root / "postgres"
        self.data = self.home / "data"
        self.socket_dir = self.home / "socket"
        self.settings_file = self.data / "cityops.conf"


def _ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError as exc:
        raise StackError(
            "user `postgres` missing: the postgresql package is not installed"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _settings_text(layout: PostgresLayout) -> str:
    settings = dict(SETTINGS)
    socket_dir = str(layout.socket_dir)
    settings["unix_socket_directories"] = (
        f"'{socket_dir}'" if len(socket_dir) <= _MAX_SOCKET_DIR else "''"
    )
    header = "# written by `cityops stack up` (cityops/stack/postgres.py)\n"
    return header + "".join(f"{key} = {value}\n" for key, value in settings.items())


def _initdb(layout: PostgresLayout, stack_secrets: StackSecrets, uid: int, gid: int) -> None:
    pwfile = layout.home / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(stack_secrets.postgres_superuser_password + "\n")
    os.chown(pwfile, uid, gid)
    try:
        run_command(
            [
                str(_bin_dir() / "initdb"),
                "-D",
                str(layout.data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            what="initdb",
            user=SERVICE_USER,
            cwd=layout.home,
        )
    finally:
        pwfile.unlink(missing_ok=True)


def prepare(paths: StackPaths, stack_secrets: StackSecrets) -> bool:
    """Create the cluster once and write its settings; returns whether the settings changed."""
    layout = PostgresLayout(paths)
    uid, gid = _ids()
    for directory in (layout.home, layout.socket_dir):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, gid)
        directory.chmod(0o700)
    if not (layout.data / "PG_VERSION").exists():
        if layout.data.exists() and any(layout.data.iterdir()):
            raise StackError(
                f"PostgreSQL data dir {layout.data} is not empty but has no PG_VERSION "
                f"(half-initialised): delete {layout.data} and run `cityops stack up` again"
            )
        print("stack: creating the PostgreSQL cluster (initdb)", flush=True)
        _initdb(layout, stack_secrets, uid, gid)
    changed = write_if_changed(layout.settings_file, _settings_text(layout), mode=0o600)
    os.chown(layout.settings_file, uid, gid)
    main_conf = layout.data / "postgresql.conf"
    include = "include_if_exists = 'cityops.conf'"
    text = main_conf.read_text(encoding="utf-8")
    if include not in text:
        main_conf.write_text(text + f"\n# cityops stack settings\n{include}\n", encoding="utf-8")
        changed = True
    return changed


def spec(paths: StackPaths) -> ServerSpec:
    """How to run the postmaster as `postgres` (SIGINT = fast shutdown)."""
    layout = PostgresLayout(paths)
    postgres = Path("/usr/lib/postgresql")
    binary = _bin_dir() / "postgres" if postgres.exists() else Path("postgres")
    return ServerSpec(
        name="postgres",
        argv=[str(binary), "-D", str(layout.data)],
        marker=str(layout.data),
        ports=(PORT,),
        user=SERVICE_USER,
        cwd=layout.home,
        stop_signal=signal.SIGINT,
        stop_timeout_s=60.0,
    )


async def provision(stack_secrets: StackSecrets) -> None:
    """Role `cityops` (LOGIN CREATEDB, our password) and database `cityops` owned by it."""
    conn = await asyncpg.connect(superuser_url(stack_secrets), timeout=10)
    try:
        # DDL takes no bind parameters; the password is url-safe base64 (no quotes possible),
        # quote_literal-style doubling is belt and braces.
        password = stack_secrets.postgres_cityops_password.replace("'", "''")
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DB_ROLE)
        verb = "ALTER" if exists else "CREATE"
        await conn.execute(f"{verb} ROLE {DB_ROLE} WITH LOGIN CREATEDB PASSWORD '{password}'")
        has_db = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME)
        if not has_db:
            await conn.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_ROLE}")
    finally:
        await conn.close()
    # the dashboards' read-only login; grants follow in migration 0300 (or now, if it ran)
    conn = await asyncpg.connect(
        superuser_url(stack_secrets).rsplit("/", 1)[0] + f"/{DB_NAME}", timeout=10
    )
    try:
        await ensure_grafana_login(conn, password=stack_secrets.postgres_grafana_password)
    finally:
        await conn.close()
