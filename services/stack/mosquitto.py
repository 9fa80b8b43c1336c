"""Mosquitto with per-device password-file credentials and a `%u` ACL."""

from __future__ import annotations

import grp
import os
import pwd
import string
import sys
from pathlib import Path

from cityops.common import mqtt_auth
from cityops.stack.credentials import GATEWAY_USER, INGEST_USER, StackSecrets
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, write_if_changed

PORT = 1883
BINARY = "/usr/sbin/mosquitto"
SERVICE_USER = "mosquitto"


class MosquittoLayout:
    """Paths under `.stack/mosquitto` (setgid group `mosquitto`, so files stay readable)."""

    def __init__(self, paths: StackPaths) -> None:
        self.home = paths.root / "mosquitto"
        self.data = self.home / "data"
        self.conf = self.home / "mosquitto.conf"
        self.acl = self.home / "acl"
        self.passwd = self.home / "passwd"
        self.service_passwd = self.home / "service.passwd"
        self.devices_passwd = self.home / "devices.passwd"
        self.lock = self.home / "passwd.lock"
        self.conf_template = paths.deploy / "mosquitto" / "mosquitto.conf"
        self.acl_template = paths.deploy / "mosquitto" / "acl"


def _ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError as exc:
        raise StackError(
            "user `mosquitto` missing: the mosquitto package is not installed properly"
        ) from exc


def render_conf(layout: MosquittoLayout) -> str:
    """The broker config from the checked-in template."""
    template = string.Template(layout.conf_template.read_text(encoding="utf-8"))
    return template.substitute(mosquitto_dir=str(layout.home))


def _service_accounts(stack_secrets: StackSecrets) -> dict[str, str]:
    return {
        INGEST_USER: stack_secrets.mqtt_ingest_password,
        GATEWAY_USER: stack_secrets.mqtt_gateway_password,
    }


def _service_passwd_current(layout: MosquittoLayout, accounts: dict[str, str]) -> bool:
    if not layout.service_passwd.exists():
        return False
    entries = mqtt_auth.parse_password_file(layout.service_passwd.read_text(encoding="utf-8"))
    return set(entries) == set(accounts) and all(
        mqtt_auth.verify_password(password, entries[user]) for user, password in accounts.items()
    )


def prepare(paths: StackPaths, stack_secrets: StackSecrets) -> tuple[bool, bool]:
    """Write config, ACL and password files; returns (config changed, credentials changed)."""
    layout = MosquittoLayout(paths)
    if not Path(BINARY).exists():
        raise StackError(f"{BINARY} not found: the mosquitto package is not installed")
    uid, gid = _ids()
    layout.home.mkdir(parents=True, exist_ok=True)
    os.chown(layout.home, 0, gid)
    # setgid: files created here (also by other tools) get group mosquitto
    layout.home.chmod(0o2750)
    layout.data.mkdir(exist_ok=True)
    os.chown(layout.data, uid, gid)
    layout.data.chmod(0o750)

    config_changed = write_if_changed(layout.conf, render_conf(layout), mode=0o640)
    credentials_changed = write_if_changed(
        layout.acl, layout.acl_template.read_text(encoding="utf-8"), mode=0o640
    )
    accounts = _service_accounts(stack_secrets)
    with mqtt_auth.password_files_lock(layout.lock):
        if not _service_passwd_current(layout, accounts):
            lines = [(user, mqtt_auth.hash_password(pw)) for user, pw in accounts.items()]
            mqtt_auth.write_file_atomic(
                layout.service_passwd, mqtt_auth.render_password_file(lines)
            )
        if not layout.devices_passwd.exists():
            mqtt_auth.write_file_atomic(layout.devices_passwd, "")
        credentials_changed |= mqtt_auth.combine_password_files(
            service_file=layout.service_passwd,
            device_file=layout.devices_passwd,
            out_file=layout.passwd,
        )
    for path in (
        layout.conf,
        layout.acl,
        layout.passwd,
        layout.service_passwd,
        layout.devices_passwd,
        layout.lock,
    ):
        os.chown(path, 0, gid)
    return config_changed, credentials_changed


def reload(paths: StackPaths) -> bool:
    """SIGHUP our broker so it re-reads passwd and acl."""
    return mqtt_auth.reload_broker(paths.child_pid_file("mosquitto"))


def spec(paths: StackPaths) -> ServerSpec:
    """How to run the broker (foreground; it drops privileges to `mosquitto` itself).

    It runs under `cityops.stack.supervise`, which restarts it after a crash (Mosquitto
    2.0.11 can segfault on SIGHUP reloads); the marker, our config path, is in both.
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
        argv=[*supervisor, BINARY, "-c", str(layout.conf)],
        marker=str(layout.conf),
        ports=(PORT,),
        cwd=layout.home,
        stop_timeout_s=20.0,
    )
