"""A PostgreSQL instance of a test's own, to stop and start without touching the shared one.

initdb into a temp dir owned by `postgres` (PostgreSQL refuses to run as root), a port from
19950-19999, loopback only, trust authentication (nothing but this test can reach it), fsync
off (it is thrown away). `stop()` is an immediate shutdown: no checkpoint, like a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from cityops.common.migrate import apply_migrations
from cityops.stack.postgres import _bin_dir

PORTS = range(19950, 20000)
_USER = "postgres"


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


@dataclass
class OwnPostgres:
    """A running cluster with database `cityops`, all migrations applied."""

    home: Path
    port: int

    @property
    def url(self) -> str:
        """The `cityops` database."""
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/cityops"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(_bin_dir() / "pg_ctl"), "-D", str(self.home / "data"), *args],
            user=_USER,
            check=True,
            capture_output=True,
            cwd=self.home,
            timeout=60,
        )

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c max_connections=60"
        )
        self._pg_ctl("-o", options, "-l", str(self.home / "postgres.log"), "-w", "start")

    def stop(self) -> None:
        """Immediate shutdown (no checkpoint): the next start recovers from the WAL."""
        self._pg_ctl("-m", "immediate", "-w", "stop")


@contextlib.asynccontextmanager
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    """A fresh cluster for one test, removed afterwards."""
    entry = pwd.getpwnam(_USER)
    home = Path(tempfile.mkdtemp(prefix="cityops-test-pg-"))
    shutil.chown(home, entry.pw_uid, entry.pw_gid)
    instance = OwnPostgres(home, _free_port())
    started = False
    try:
        await asyncio.to_thread(
            subprocess.run,
            [
                str(_bin_dir() / "initdb"),
                "-D",
                str(home / "data"),
                "-U",
                _USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            user=_USER,
            check=True,
            capture_output=True,
            cwd=home,
            timeout=120,
        )
        await asyncio.to_thread(instance.start)
        started = True
        admin = await asyncpg.connect(instance.url.replace("/cityops", "/postgres"))
        try:
            await admin.execute("CREATE DATABASE cityops")
        finally:
            await admin.close()
        conn = await asyncpg.connect(instance.url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield instance
    finally:
        if started:
            with contextlib.suppress(subprocess.CalledProcessError):
                await asyncio.to_thread(instance.stop)
        shutil.rmtree(home, ignore_errors=True)
