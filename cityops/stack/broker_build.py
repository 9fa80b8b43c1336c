"""Mosquitto 2.0.21 built from Debian 13's source package, and the cityops auth plugin.

Debian 12 ships Mosquitto 2.0.11 (shared subscriptions lost at restart, aborts on reloads after
deleted MQTT 5 sessions: upstream #3418). Debian's archive also serves trixie's source, whose
build dependencies are all in Debian 12, so the stack builds the broker itself:

1. a `deb-src` line for trixie main in its own sources.list.d file, signed by the Debian archive
   keyring Debian 12 ships (apt checks the Sources index and every file's hash against it);
2. the few -dev packages the broker needs, by name (`apt-get build-dep` would ask for trixie's
   versions of debhelper and friends): a C compiler, make, libssl-dev, dpkg-dev;
3. `apt-get source --download-only`, `dpkg-source -x` (Debian's patches), our patches from
   deploy/mosquitto/patches/, `make mosquitto` in src/ only (no docs, websockets, cJSON,
   clients or library): about 10 s on 2 cores;
4. the broker and its plugin headers installed into PREFIX, outside any checkout, with a
   BUILD file naming the source version and the patches' digest: a later `stack up` or another
   clone on the same machine reuses it; a missing or different build is redone.

The plugin (deploy/mosquitto/plugin/) is compiled per checkout by its Makefile against
PREFIX/include, so a change to it only costs a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cityops.stack.layout import StackError
from cityops.stack.packages import missing_packages
from cityops.stack.procs import run_command

VERSION = "2.0.21"
DEBIAN_VERSION = f"{VERSION}-1"
PREFIX = Path(f"/opt/cityops/mosquitto-{VERSION}")
BINARY = PREFIX / "sbin" / "mosquitto"
INCLUDE = PREFIX / "include"
SOURCES_FILE = Path("/etc/apt/sources.list.d/cityops-trixie-src.sources")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SOURCES = f"""# written by `cityops stack up`: Debian 13's mosquitto source, built by the stack
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: {KEYRING}
"""
BUILD_PACKAGES = ("gcc", "make", "libc6-dev", "libssl-dev", "dpkg-dev", "patch")
# what the broker is built with: TLS, persistence, bridges; nothing that needs more -dev packages
MAKE_FLAGS = (
    "WITH_CJSON=no",
    "WITH_DOCS=no",
    "WITH_WEBSOCKETS=no",
    "WITH_SYSTEMD=no",
    "WITH_SRV=no",
    "WITH_WRAP=no",
    "WITH_DLT=no",
)
HEADERS = ("mosquitto.h", "mosquitto_broker.h", "mosquitto_plugin.h", "mqtt_protocol.h")
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}


def patches(deploy: Path) -> list[Path]:
    """Our patches to the broker source, applied in name order."""
    return sorted((deploy / "mosquitto" / "patches").glob("*.patch"))


def build_id(deploy: Path) -> str:
    """What a build in PREFIX must have been made from: source version, flags, patches."""
    digest = hashlib.sha256()
    digest.update(f"{DEBIAN_VERSION} {' '.join(MAKE_FLAGS)}\n".encode())
    for patch in patches(deploy):
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return f"mosquitto {DEBIAN_VERSION} patches {digest.hexdigest()[:16]}\n"


def build_current(deploy: Path, prefix: Path = PREFIX) -> bool:
    """Whether `prefix` holds a finished build of this checkout's recipe."""
    stamp = prefix / "BUILD"
    return (
        (prefix / "sbin" / "mosquitto").is_file()
        and stamp.is_file()
        and stamp.read_text(encoding="utf-8") == build_id(deploy)
    )


def _ensure_source_line() -> bool:
    """Write the trixie deb-src file; returns whether it changed (apt-get update needed)."""
    if not KEYRING.exists():
        raise StackError(f"{KEYRING} missing: install debian-archive-keyring")
    if SOURCES_FILE.exists() and SOURCES_FILE.read_text(encoding="utf-8") == SOURCES:
        return False
    SOURCES_FILE.write_text(SOURCES, encoding="utf-8")
    return True


def _missing_build_packages() -> list[str]:
    return missing_packages(BUILD_PACKAGES)


def _fetch_source(workdir: Path) -> Path:
    """Download and unpack Debian's source package (with Debian's patches) into workdir."""
    fetch = ["apt-get", "source", "--download-only", "-q", f"mosquitto={DEBIAN_VERSION}"]
    completed = subprocess.run(  # noqa: S603 - fixed argv
        fetch, cwd=workdir, capture_output=True, text=True, check=False, env=_env()
    )
    if completed.returncode != 0:
        # a stale package index: refresh once and retry
        run_command(["apt-get", "update", "-q"], what="apt-get update", env=_APT_ENV)
        run_command(fetch, what="apt-get source mosquitto", env=_APT_ENV, cwd=workdir)
    dsc = workdir / f"mosquitto_{DEBIAN_VERSION}.dsc"
    source = workdir / "src"
    run_command(
        ["dpkg-source", "-x", str(dsc), str(source)],
        what="dpkg-source -x mosquitto",
        env=_APT_ENV,
        cwd=workdir,
    )
    return source


def _env() -> dict[str, str]:
    return {**os.environ, **_APT_ENV}


def compile_broker(source: Path, deploy: Path, prefix: Path) -> None:
    """Patch, build and install the broker from an unpacked source tree into `prefix`."""
    for patch in patches(deploy):
        run_command(
            ["patch", "-p1", "-i", str(patch.resolve())], what=f"patch {patch.name}", cwd=source
        )
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    run_command(
        ["make", "-C", "src", f"-j{jobs}", *MAKE_FLAGS, "mosquitto"],
        what="make mosquitto",
        cwd=source,
    )
    staging = prefix.with_name(f".{prefix.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "sbin").mkdir(parents=True)
    (staging / "include").mkdir()
    shutil.copy2(source / "src" / "mosquitto", staging / "sbin" / "mosquitto")
    for header in HEADERS:
        shutil.copy2(source / "include" / header, staging / "include" / header)
    (staging / "BUILD").write_text(build_id(deploy), encoding="utf-8")
    for directory in (staging, staging / "sbin", staging / "include"):
        directory.chmod(0o755)
    old = prefix.with_name(f".{prefix.name}.old.{os.getpid()}")
    if prefix.exists():
        prefix.rename(old)
    staging.rename(prefix)
    shutil.rmtree(old, ignore_errors=True)


def ensure_broker(deploy: Path, prefix: Path = PREFIX) -> bool:
    """Build and install the broker unless `prefix` already has this recipe; True if built."""
    if build_current(deploy, prefix):
        return False
    if os.geteuid() != 0:
        raise StackError(f"{prefix} needs building; run `cityops stack up` as root")
    print(f"stack: building Mosquitto {DEBIAN_VERSION} from Debian's source into {prefix}")
    changed = _ensure_source_line()
    missing = _missing_build_packages()
    if changed or missing:
        run_command(["apt-get", "update", "-q"], what="apt-get update", env=_APT_ENV)
    if missing:
        run_command(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            what=f"apt-get install {' '.join(missing)}",
            env=_APT_ENV,
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.parent.chmod(0o755)
    with tempfile.TemporaryDirectory(prefix="cityops-mosquitto-") as tmp:
        workdir = Path(tmp)
        source = _fetch_source(workdir)
        compile_broker(source, deploy, prefix)
    return True


def build_plugin(deploy: Path, out: Path, include: Path = INCLUDE) -> Path:
    """Compile the auth plugin into `out` when its source changed (make decides)."""
    run_command(
        [
            "make",
            "-s",
            "-C",
            str(deploy / "mosquitto" / "plugin"),
            f"MOSQUITTO_INCLUDE={include}",
            f"OUT={out}",
        ],
        what="make the cityops_auth plugin",
    )
    return out
