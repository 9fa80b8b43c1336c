"""A Mosquitto of its own (fault tests, benches): the stack's binary and config, another port.

`BrokerInstance.create(home, port=..., accounts=...)` renders the same config the stack renders
(`cityops.stack.mosquitto.render_conf` of a `BrokerLayout` in `home` on `port`), builds the
auth plugin into `home`, writes the service accounts of `accounts` to service.passwd and the
rest (devices) to devices.passwd, and can then be started, stopped cleanly (SIGTERM), killed
(-9) and started again on the same data directory; `provision()` / `revoke()` change devices
the way the API does (the plugin follows, no signal). It never touches the shared broker on
1883. `conf_text` runs another broker's config instead (e.g. Debian's 2.0.11 with a password
file and an ACL: all accounts are then also written to `passwd`, and `acl` is LEGACY_ACL).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cityops.api.devices.credentials import BrokerFiles, apply_to_files
from cityops.common import mqtt_auth
from cityops.stack import mosquitto
from cityops.stack.credentials import DISPATCHER_USER, GATEWAY_USER, INGEST_USER
from cityops.stack.layout import StackError, repo_root

SERVICE_USERS = frozenset({INGEST_USER, GATEWAY_USER, DISPATCHER_USER})
# the ACL the stack gave Debian's 2.0.11 before the auth plugin (for `conf_text` baselines)
LEGACY_ACL = """\
pattern write city/+/%u/telemetry
pattern write city/+/%u/status
user ingest
topic read city/#
user gateway
topic write city/#
"""


def layout_for(home: Path, *, port: int) -> mosquitto.BrokerLayout:
    """The stack's broker layout moved to `home`, listening on `port`."""
    return mosquitto.BrokerLayout(home=home, deploy=repo_root() / "deploy", port=port)


def render_instance_conf(home: Path, *, port: int) -> str:
    """The stack's rendered mosquitto.conf for a broker living in `home`, listening on `port`."""
    return mosquitto.render_conf(layout_for(home, port=port))


def _service_ids() -> tuple[int, int]:
    return pwd.getpwnam(mosquitto.SERVICE_USER).pw_uid, grp.getgrnam(mosquitto.SERVICE_USER).gr_gid


@dataclass
class BrokerInstance:
    """One broker process on `port` with its config, credentials and data under `home`."""

    home: Path
    port: int
    binary: str = mosquitto.BINARY
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    accounts: dict[str, str] = field(default_factory=dict)  # the service accounts it knows
    _log: Path = field(init=False)

    def __post_init__(self) -> None:
        self._log = self.home / "broker.log"

    @property
    def conf(self) -> Path:
        return self.home / "mosquitto.conf"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def host(self) -> str:
        """Where it listens (loopback)."""
        return "127.0.0.1"

    @property
    def files(self) -> BrokerFiles:
        """Its devices file and lock: what the API's settings point at."""
        layout = layout_for(self.home, port=self.port)
        return BrokerFiles(device_file=layout.devices_passwd, lock_file=layout.lock)

    @property
    def pid(self) -> int:
        """The running broker's pid."""
        if self.process is None:
            raise StackError(f"broker on :{self.port} was never started")
        return self.process.pid

    def alive(self) -> bool:
        """Whether the broker process runs."""
        return self.process is not None and self.process.poll() is None

    def provision(self, device_id: str) -> str:
        """Give `device_id` a fresh password (returned); the plugin picks it up, no signal."""
        password = secrets.token_urlsafe(16)
        apply_to_files(self.files, {device_id: mqtt_auth.hash_password(password)})
        return password

    def revoke(self, *device_ids: str) -> None:
        """Remove devices; the plugin drops their connections."""
        apply_to_files(self.files, dict.fromkeys(device_ids))

    @classmethod
    def create(
        cls,
        home: Path,
        *,
        port: int,
        accounts: Mapping[str, str],
        binary: str = mosquitto.BINARY,
        conf_text: str | None = None,
    ) -> BrokerInstance:
        """Write config, plugin and password files for `accounts` (username -> password).

        Files are owned like the stack's (group `mosquitto`): the broker drops privileges to
        that user after binding. `conf_text` replaces the stack's config (another broker's).
        """
        _, gid = _service_ids()
        layout = layout_for(home, port=port)
        services = {u: p for u, p in accounts.items() if u in SERVICE_USERS}
        devices = [
            (user, mqtt_auth.hash_password(pw))
            for user, pw in accounts.items()
            if user not in services
        ]
        mosquitto.prepare_layout(layout, services)
        instance = cls(home=home, port=port, binary=binary, accounts=services)
        files = {layout.devices_passwd: mqtt_auth.render_password_file(devices)}
        if conf_text is not None:
            everything = [(u, mqtt_auth.hash_password(p)) for u, p in services.items()] + devices
            files.update(
                {
                    instance.conf: conf_text,
                    home / "acl": LEGACY_ACL,
                    home / "passwd": mqtt_auth.render_password_file(everything),
                }
            )
        for path, text in files.items():
            mqtt_auth.write_file_atomic(path, text)
            os.chown(path, 0, gid)
        return instance

    def start(self, *, within_s: float = 15.0) -> None:
        """Start the broker and return once it accepts TCP connections on its port."""
        if self.process is not None and self.process.poll() is None:
            raise StackError(f"broker on :{self.port} is already running")
        with self._log.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - our binary and our config
                [self.binary, "-c", str(self.conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        self.starts += 1
        deadline = time.monotonic() + within_s
        while not self._listening():
            if self.process.poll() is not None:
                raise StackError(f"broker on :{self.port} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"broker on :{self.port} not listening within {within_s}s")
            time.sleep(0.02)

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def stop(self, *, within_s: float = 20.0) -> int:
        """SIGTERM (Mosquitto saves its database) and wait; returns the exit code."""
        return self._end(signal.SIGTERM, within_s)

    def kill(self) -> int:
        """SIGKILL: whatever the broker held since its last autosave is gone."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, signum: signal.Signals, within_s: float) -> int:
        if self.process is None:
            raise StackError(f"broker on :{self.port} was never started")
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=within_s)

    def rss_kb(self) -> int:
        """Resident set size of the running broker (VmRSS), in KiB."""
        if self.process is None:
            raise StackError(f"broker on :{self.port} was never started")
        status = Path(f"/proc/{self.process.pid}/status").read_text(encoding="utf-8")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise StackError(f"no VmRSS for pid {self.process.pid}")

    def version(self) -> str:
        """`2.0.11` from `mosquitto -h`."""
        out = subprocess.run(  # noqa: S603 - our binary
            [self.binary, "-h"], capture_output=True, text=True, check=False
        ).stdout
        found = re.search(r"mosquitto version (\S+)", out)
        return found.group(1) if found else "unknown"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's output."""
        if not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Kill the broker if it still runs (the directory is the caller's to remove)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def broker_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory the broker (user `mosquitto`) can reach; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


def free_port(ports: range) -> int:
    """The first port of `ports` nothing listens on or is bound to right now."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise StackError(f"no free port in {ports.start}-{ports.stop - 1}")
