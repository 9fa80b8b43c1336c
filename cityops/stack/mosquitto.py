"""Mosquitto 2.0.21 (built by broker_build) with the cityops auth plugin.

The plugin (deploy/mosquitto/plugin/) authenticates against `service.passwd` and
`devices.passwd` and re-reads them when they change: no signal, no reload. `BrokerLayout`
renders and prepares one broker (home folder, port, accounts); the stack's broker is one, and
tests that must restart or kill a broker start their own with another home and port.
"""

from __future__ import annotations

import grp
import os
import pwd
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cityops.common import mqtt_auth
from cityops.stack import broker_build
from cityops.stack.credentials import (
    DISPATCHER_USER,
    GATEWAY_USER,
    INGEST_USER,
    RESERVED_MQTT_IDS,
    StackSecrets,
)
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, write_if_changed

PORT = 1883
BINARY = str(broker_build.BINARY)
SERVICE_USER = "mosquitto"
MAX_SESSIONS_PER_DEVICE = 3


@dataclass(frozen=True)
class BrokerLayout:
    """One broker: where its files live and what it listens on."""

    home: Path
    deploy: Path
    port: int = PORT
    bind: str = "127.0.0.1"
    max_sessions: int = MAX_SESSIONS_PER_DEVICE

    @property
    def data(self) -> Path:
        """Persistence (mosquitto.db)."""
        return self.home / "data"

    @property
    def conf(self) -> Path:
        """The rendered mosquitto.conf."""
        return self.home / "mosquitto.conf"

    @property
    def service_passwd(self) -> Path:
        """Service accounts (ingest, gateway, dispatcher), written by the stack."""
        return self.home / "service.passwd"

    @property
    def devices_passwd(self) -> Path:
        """One line per device, written by the API (and the simulator's direct mode)."""
        return self.home / "devices.passwd"

    @property
    def lock(self) -> Path:
        """flock shared by every writer of the password files."""
        return self.home / "passwd.lock"

    @property
    def plugin(self) -> Path:
        """The compiled auth plugin."""
        return self.home / "cityops_auth.so"

    @property
    def conf_template(self) -> Path:
        """The checked-in config template."""
        return self.deploy / "mosquitto" / "mosquitto.conf"


class MosquittoLayout(BrokerLayout):
    """The stack's own broker: `.stack/mosquitto`, port 1883 on loopback."""

    def __init__(self, paths: StackPaths) -> None:
        super().__init__(home=paths.root / "mosquitto", deploy=paths.deploy)


def _ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError as exc:
        raise StackError(
            "user `mosquitto` missing: the mosquitto package is not installed properly"
        ) from exc


def render_conf(layout: BrokerLayout) -> str:
    """The broker config from the checked-in template."""
    template = string.Template(layout.conf_template.read_text(encoding="utf-8"))
    return template.substitute(
        mosquitto_dir=str(layout.home),
        port=str(layout.port),
        bind_address=layout.bind,
        plugin=str(layout.plugin),
        ingest_user=INGEST_USER,
        gateway_user=GATEWAY_USER,
        dispatcher_user=DISPATCHER_USER,
        reserved_ids=",".join(RESERVED_MQTT_IDS),
        max_sessions=str(layout.max_sessions),
    )


def service_accounts(stack_secrets: StackSecrets) -> dict[str, str]:
    """Service account name -> clear-text password."""
    return {
        INGEST_USER: stack_secrets.mqtt_ingest_password,
        GATEWAY_USER: stack_secrets.mqtt_gateway_password,
        DISPATCHER_USER: stack_secrets.mqtt_dispatcher_password,
    }


def _service_passwd_current(path: Path, accounts: Mapping[str, str]) -> bool:
    if not path.exists():
        return False
    entries = mqtt_auth.parse_password_file(path.read_text(encoding="utf-8"))
    return set(entries) == set(accounts) and all(
        mqtt_auth.verify_password(password, entries[user]) for user, password in accounts.items()
    )


def prepare_layout(layout: BrokerLayout, accounts: Mapping[str, str]) -> bool:
    """Build what is missing and write config and service accounts; True if the config changed.

    Run as root: the folder is setgid `mosquitto` so the broker, which drops privileges to that
    user, reads every file in it and writes data/.
    """
    broker_build.ensure_broker(layout.deploy)
    uid, gid = _ids()
    layout.home.mkdir(parents=True, exist_ok=True)
    os.chown(layout.home, 0, gid)
    layout.home.chmod(0o2750)
    layout.data.mkdir(exist_ok=True)
    os.chown(layout.data, uid, gid)
    layout.data.chmod(0o750)
    plugin_before = layout.plugin.stat().st_mtime_ns if layout.plugin.exists() else None
    broker_build.build_plugin(layout.deploy, layout.plugin)
    config_changed = write_if_changed(layout.conf, render_conf(layout), mode=0o640)
    config_changed |= layout.plugin.stat().st_mtime_ns != plugin_before
    with mqtt_auth.password_files_lock(layout.lock):
        if not _service_passwd_current(layout.service_passwd, accounts):
            lines = [(user, mqtt_auth.hash_password(pw)) for user, pw in accounts.items()]
            mqtt_auth.write_file_atomic(
                layout.service_passwd, mqtt_auth.render_password_file(lines)
            )
        if not layout.devices_passwd.exists():
            mqtt_auth.write_file_atomic(layout.devices_passwd, "")
    for path in (
        layout.conf,
        layout.plugin,
        layout.service_passwd,
        layout.devices_passwd,
        layout.lock,
    ):
        os.chown(path, 0, gid)
    return config_changed


def prepare(paths: StackPaths, stack_secrets: StackSecrets) -> bool:
    """Prepare the stack's broker; returns whether its config (or plugin) changed."""
    return prepare_layout(MosquittoLayout(paths), service_accounts(stack_secrets))


def broker_argv(layout: BrokerLayout) -> list[str]:
    """The broker's own command line (foreground; it drops privileges to `mosquitto`)."""
    return [str(BINARY), "-c", str(layout.conf)]


def spec(paths: StackPaths) -> ServerSpec:
    """How to run the broker: under `cityops.stack.supervise`, restarted whenever it exits.

    The marker, our config path, is in both command lines.
    """
    layout = MosquittoLayout(paths)
    supervisor = [
        sys.executable,
        "-m",
        "cityops.stack.supervise",
        "--name",
        "mosquitto",
        "--pid-file",
        str(paths.child_pid_file("mosquitto")),
        "--",
    ]
    return ServerSpec(
        name="mosquitto",
        argv=[*supervisor, *broker_argv(layout)],
        marker=str(layout.conf),
        ports=(PORT,),
        cwd=layout.home,
        stop_timeout_s=20.0,
    )
