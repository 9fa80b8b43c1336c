"""Facts about the machine and the software a benchmark ran on (read, never typed in)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

PACKAGES = (
    "cityops",
    "paho-mqtt",
    "aiokafka",
    "asyncpg",
    "fastapi",
    "uvicorn",
    "pydantic",
    "orjson",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str) -> str:
    """The `model name` line of /proc/cpuinfo."""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def memory_gib(meminfo: str) -> float | None:
    """MemTotal of /proc/meminfo in GiB."""
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def os_name(os_release: str) -> str:
    """PRETTY_NAME of /etc/os-release."""
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', os_release, re.MULTILINE)
    return match.group(1) if match else platform.system()


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, kernel, Python, and how busy the machine was."""
    load1, load5, _ = os.getloadavg()
    return {
        "cores (os.cpu_count)": os.cpu_count(),
        "CPU model": cpu_model(_read("/proc/cpuinfo")),
        "memory (GiB)": memory_gib(_read("/proc/meminfo")),
        "OS": os_name(_read("/etc/os-release")),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "load average at start (1 min / 5 min)": f"{load1:.2f} / {load5:.2f}",
    }


def _command_version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603 - fixed argv
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


def kafka_version(stack_dir: Path) -> str:
    """The version in the stack's kafka-clients jar name."""
    libs = stack_dir / "kafka" / "libs"
    for jar in sorted(libs.glob("kafka-clients-*.jar")) if libs.is_dir() else []:
        return jar.name.removeprefix("kafka-clients-").removesuffix(".jar")
    return "unknown"


def git_commit(repo: Path) -> str:
    """The checked-out commit, marked dirty when tracked files changed."""
    head = _command_version(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], r"(\w+)")
    dirty = subprocess.run(  # noqa: S603 - fixed argv
        ["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--", "cityops"],  # noqa: S607
        capture_output=True,
        check=False,
    )
    return head + (" (+ uncommitted changes in cityops/)" if dirty.returncode == 1 else "")


async def versions(*, database_url: str | None, stack_dir: Path, repo: Path) -> dict[str, Any]:
    """Versions of cityops' dependencies and of the servers it ran against."""
    found: dict[str, Any] = {"git commit": git_commit(repo)}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["Mosquitto"] = _command_version(["mosquitto", "-h"], r"mosquitto version (\S+)")
    found["Kafka"] = kafka_version(stack_dir)
    persistence = stack_dir / "mosquitto" / "data" / "mosquitto.db"
    if persistence.exists():
        # the broker rewrites this file every autosave interval, blocking while it does
        found["Mosquitto persistence file at start (MB)"] = round(
            persistence.stat().st_size / 2**20, 1
        )
    if database_url is not None:
        try:
            conn = await asyncpg.connect(database_url, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            found["PostgreSQL"] = f"unreachable ({exc.__class__.__name__})"
        else:
            try:
                found["PostgreSQL"] = await conn.fetchval("SHOW server_version")
            finally:
                await conn.close()
    return found
