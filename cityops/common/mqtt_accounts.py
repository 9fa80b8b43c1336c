"""Write the service accounts' Mosquitto password file from settings (the compose init step).

`python -m cityops.common.mqtt_accounts DIR` writes DIR/service.passwd with the ingest,
simulator gateway and command dispatcher accounts, and an empty DIR/devices.passwd when there
is none yet: the two files the broker's auth plugin reads (the API writes devices.passwd).
The native stack does the same in `cityops stack up`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from cityops.common.mqtt_auth import hash_password, render_password_file, write_file_atomic


class ServiceAccountSettings(BaseSettings):
    """The MQTT service accounts' names and passwords."""

    model_config = SettingsConfigDict(env_prefix="CITYOPS_", extra="ignore", frozen=True)

    ingest_mqtt_username: str = "ingest"
    ingest_mqtt_password: SecretStr
    simulator_mqtt_username: str = "gateway"
    simulator_mqtt_password: SecretStr
    dispatcher_mqtt_username: str = "dispatcher"
    dispatcher_mqtt_password: SecretStr


def write_service_accounts(settings: ServiceAccountSettings, folder: Path) -> Path:
    """Write folder/service.passwd (and an empty devices.passwd if missing); returns the former."""
    folder.mkdir(parents=True, exist_ok=True)
    service_file = folder / "service.passwd"
    accounts = [
        (settings.ingest_mqtt_username, settings.ingest_mqtt_password),
        (settings.simulator_mqtt_username, settings.simulator_mqtt_password),
        (settings.dispatcher_mqtt_username, settings.dispatcher_mqtt_password),
    ]
    text = render_password_file(
        (user, hash_password(password.get_secret_value())) for user, password in accounts
    )
    write_file_atomic(service_file, text)
    devices = folder / "devices.passwd"
    if not devices.exists():
        write_file_atomic(devices, "")
    return service_file


def main(argv: list[str]) -> int:
    """Entry point: one argument, the folder shared with the broker."""
    if len(argv) != 1:
        print("usage: python -m cityops.common.mqtt_accounts DIR", file=sys.stderr)
        return 2
    settings = ServiceAccountSettings()  # fields come from the environment
    print(write_service_accounts(settings, Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
