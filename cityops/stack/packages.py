"""Debian packages the stack needs, installed without letting Debian start its own services."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cityops.stack.layout import StackError
from cityops.stack.procs import run_command

REQUIRED_PACKAGES = ("mosquitto", "mosquitto-clients", "postgresql", "prometheus", "kcat")
# Debian services that the packages auto-start on our ports; we run our own instances instead.
DEBIAN_SERVICES = ("mosquitto", "prometheus")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}


def missing_packages(packages: tuple[str, ...] = REQUIRED_PACKAGES) -> list[str]:
    """The packages of `packages` that dpkg does not list as installed."""
    missing = []
    for package in packages:
        completed = subprocess.run(  # noqa: S603 - fixed argv
            ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],  # noqa: S607 - Debian tool
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0 or not completed.stdout.startswith("ii"):
            missing.append(package)
    return missing


@contextlib.contextmanager
def services_may_not_start() -> Iterator[None]:
    """Install a policy-rc.d that forbids starting services (unless one already exists)."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(
        "#!/bin/sh\n# written by cityops stack during apt-get install\nexit 101\n"
    )
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def ensure_packages() -> list[str]:
    """Install whatever of REQUIRED_PACKAGES is missing; returns what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0:
        raise StackError(f"packages missing ({' '.join(missing)}); run `cityops stack up` as root")
    print(f"stack: installing {' '.join(missing)} (apt-get)", flush=True)
    with services_may_not_start():
        run_command(["apt-get", "update", "-q"], what="apt-get update", env=_APT_ENV)
        run_command(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            what=f"apt-get install {' '.join(missing)}",
            env=_APT_ENV,
        )
    still = missing_packages()
    if still:
        raise StackError(f"apt-get did not install {' '.join(still)}")
    for service in DEBIAN_SERVICES:
        stop_debian_service(service, disable=True)
    return missing


def _systemd_is_init() -> bool:
    return Path("/run/systemd/system").is_dir()


def stop_debian_service(service: str, *, disable: bool) -> None:
    """Stop Debian's own `service` unit (best effort) and, if asked, keep it off at boot."""
    if _systemd_is_init():
        action = ["systemctl", "disable", "--now", service] if disable else ["systemctl", "stop"]
        if not disable:
            action.append(service)
        subprocess.run(action, capture_output=True, check=False)  # noqa: S603
        return
    if Path(f"/etc/init.d/{service}").exists():
        subprocess.run(  # noqa: S603
            ["service", service, "stop"],  # noqa: S607 - Debian tool
            capture_output=True,
            check=False,
        )
        if disable:
            subprocess.run(  # noqa: S603
                ["update-rc.d", service, "disable"],  # noqa: S607 - Debian tool
                capture_output=True,
                check=False,
            )


def stop_debian_postgres() -> None:
    """Stop Debian's system clusters (pg_ctlcluster) so our own cluster can own port 5432."""
    if not shutil.which("pg_lsclusters"):
        return
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"],  # noqa: S607 - Debian tool
        capture_output=True,
        text=True,
        check=False,
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].startswith("online"):
            subprocess.run(  # noqa: S603
                ["pg_ctlcluster", fields[0], fields[1], "stop"],  # noqa: S607 - Debian tool
                capture_output=True,
                check=False,
            )


def require_tools() -> None:
    """Fail early, with one line, when a tool the stack cannot install itself is missing."""
    for tool, hint in (
        ("java", "install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"),
        ("mvn", "install Maven (apt-get install maven)"),
    ):
        if shutil.which(tool) is None:
            raise StackError(f"{tool} not found on PATH: {hint}")
