"""A broker of a test's own: the stack's config renderer, another port and folder.

Tests that restart, kill or crash a broker must not touch the shared one (others' tests use
it). `OwnBroker` renders the stack's mosquitto.conf (services/stack/mosquitto.py) into a temp
folder with a free port of `PORTS`, with the same binary, plugin and service accounts as the
stack, and can start, stop (SIGTERM), kill (-9) and restart it; `provision()` writes a device
into its devices.passwd the way the API does (`files`: what the API's settings name). The
`own_broker` fixture (conftest.py) makes one per test and removes it afterwards.

    async def test_x(own_broker: OwnBroker) -> None:
        password = own_broker.provision("wb-1")
        ...connect to own_broker.host / own_broker.port...
        own_broker.kill(); own_broker.start()
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cityops.api.provisioning import BrokerFiles, apply_to_files
from cityops.common import mqtt_auth
from cityops.stack import mosquitto
from cityops.stack.credentials import DISPATCHER_USER, GATEWAY_USER, INGEST_USER
from cityops.stack.layout import repo_root
from cityops.stack.probes import mqtt_connect_reason

# the range the broker engineer's tests use; a suite of its own passes another range
PORTS = range(18830, 18900)
START_TIMEOUT_S = 20.0


def free_port(ports: Iterable[int] = PORTS) -> int:
    """The first port of `ports` nobody listens on (bound and released to check)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


@dataclass
class OwnBroker:
    """One broker process of a test's own (see the module doc)."""

    instance: mosquitto.BrokerInstance
    accounts: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.instance.home / "broker.log"

    @classmethod
    def create(
        cls,
        *,
        ports: Iterable[int] = PORTS,
        max_sessions: int = 3,
        accounts: Mapping[str, str] | None = None,
    ) -> OwnBroker:
        """Render and prepare (not start) a broker in a fresh temp folder.

        `accounts` (service user -> password) defaults to fresh passwords for ingest, gateway
        and dispatcher.
        """
        home = Path(tempfile.mkdtemp(prefix="cityops-broker-"))
        instance = mosquitto.BrokerInstance(
            home=home,
            deploy=repo_root() / "deploy",
            port=free_port(ports),
            max_sessions=max_sessions,
        )
        if accounts is None:
            users = (INGEST_USER, GATEWAY_USER, DISPATCHER_USER)
            accounts = {user: secrets.token_urlsafe(16) for user in users}
        accounts = dict(accounts)
        mosquitto.prepare_instance(instance, accounts)
        return cls(instance=instance, accounts=accounts)

    @property
    def files(self) -> BrokerFiles:
        """Its devices file and lock, as the API's settings name them."""
        return BrokerFiles(device_file=self.instance.devices_passwd, lock_file=self.instance.lock)

    @property
    def host(self) -> str:
        """Where the broker listens."""
        return self.instance.bind

    @property
    def port(self) -> int:
        """Its port."""
        return self.instance.port

    @property
    def pid(self) -> int:
        """The broker's pid (started)."""
        assert self.process is not None, "start() first"
        return self.process.pid

    def alive(self) -> bool:
        """Whether the broker process is running."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the broker and wait until the ingest account can CONNECT."""
        assert not self.alive(), "already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                mosquitto.broker_argv(self.instance),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.instance.home,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        reason: str | None = "not tried"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"broker exited at start: {self.log_tail()}")
            reason = mqtt_connect_reason(
                self.host, self.port, username=INGEST_USER, password=self.accounts[INGEST_USER]
            )
            if reason is None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"broker did not answer within {START_TIMEOUT_S}s: {reason}")

    def _end(self, signum: int, timeout_s: float = 20.0) -> int:
        assert self.process is not None, "start() first"
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> int:
        """SIGTERM (a clean stop: sessions saved); returns the exit code."""
        return self._end(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL; returns the exit code."""
        return self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Clean stop, then start."""
        self.stop()
        self.start()

    def provision(self, device_id: str) -> str:
        """Give `device_id` credentials (a fresh password, returned); no signal, no reload."""
        password = secrets.token_urlsafe(16)
        apply_to_files(self.files, {device_id: mqtt_auth.hash_password(password)})
        return password

    def revoke(self, *device_ids: str) -> None:
        """Remove devices from devices.passwd."""
        apply_to_files(self.files, dict.fromkeys(device_ids))

    def log_tail(self, lines: int = 20) -> str:
        """The end of the broker's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def remove(self) -> None:
        """Kill the broker if it runs and delete its folder."""
        if self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.kill()
        shutil.rmtree(self.instance.home, ignore_errors=True)


@contextlib.contextmanager
def own_broker_running(
    *, ports: Iterable[int] = PORTS, max_sessions: int = 3
) -> Iterator[OwnBroker]:
    """A started `OwnBroker`, removed afterwards."""
    broker = OwnBroker.create(ports=ports, max_sessions=max_sessions)
    try:
        broker.start()
        yield broker
    finally:
        broker.remove()
