"""A Mosquitto of its own (fault tests, benches): the stack's binary and config, another port.

`BrokerInstance.create(home, port=..., accounts=...)` renders the same config the stack renders
(`cityops.stack.mosquitto.render_conf`), with only the listener port and the directory changed,
writes the credentials, and can then be started, stopped cleanly (SIGTERM), killed (-9) and
started again on the same data directory. It never touches the shared broker on 1883.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cityops.common import mqtt_auth
from cityops.stack import mosquitto
from cityops.stack.layout import StackError, StackPaths, repo_root

_LISTENER = re.compile(rf"^listener\s+{mosquitto.PORT}\b", re.MULTILINE)


def render_instance_conf(home: Path, *, port: int) -> str:
    """The stack's rendered mosquitto.conf for a broker living in `home`, listening on `port`."""
    layout = mosquitto.MosquittoLayout(StackPaths(repo=repo_root()))
    layout.home = home
    rendered = mosquitto.render_conf(layout)
    if not _LISTENER.search(rendered):
        raise StackError(f"no `listener {mosquitto.PORT}` line in {layout.conf_template}")
    return _LISTENER.sub(f"listener {port}", rendered, count=1)


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
    _log: Path = field(init=False)

    def __post_init__(self) -> None:
        self._log = self.home / "broker.log"

    @property
    def conf(self) -> Path:
        return self.home / "mosquitto.conf"

    @property
    def data(self) -> Path:
        return self.home / "data"

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
        """Write config, ACL and one password file for `accounts` (username -> password).

        Files are owned like the stack's (group `mosquitto`): the broker drops privileges to
        that user after binding. `conf_text` replaces the stack's config (another broker's).
        """
        uid, gid = _service_ids()
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, 0, gid)
        home.chmod(0o2750)
        instance = cls(home=home, port=port, binary=binary)
        instance.data.mkdir(exist_ok=True)
        os.chown(instance.data, uid, gid)
        instance.data.chmod(0o750)
        layout = mosquitto.MosquittoLayout(StackPaths(repo=repo_root()))
        lines = [(user, mqtt_auth.hash_password(pw)) for user, pw in accounts.items()]
        files = {
            instance.conf: conf_text or render_instance_conf(home, port=port),
            home / "acl": layout.acl_template.read_text(encoding="utf-8"),
            home / "passwd": mqtt_auth.render_password_file(lines),
        }
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
