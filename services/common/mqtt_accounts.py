"""Write the service accounts' Mosquitto password file from settings (the compose init step).

`python -m cityops.common.mqtt_accounts DIR` writes DIR/service.passwd with the ingest and
simulator gateway accounts, and DIR/passwd = service accounts + DIR/devices.passwd, the file
the broker reads. The native stack does the same in `cityops stack up`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from cityops.common.mqtt_auth import (
    combine_password_files,
    hash_password,
    render_password_file,
    write_file_atomic,
)


class ServiceAccountSettings(BaseSettings):
    """The MQTT service accounts' names and passwords."""

    model_config = SettingsConfigDict(env_prefix="CITYOPS_", extra="ignore", frozen=True)

    ingest_mqtt_username: str = "ingest"
    ingest_mqtt_password: SecretStr
    simulator_mqtt_username: str = "gateway"
    simulator_mqtt_password: SecretStr


def write_service_accounts(settings: ServiceAccountSettings, folder: Path) -> Path:
    """Write folder/service.passwd and re-render folder/passwd; returns the broker's file."""
    folder.mkdir(parents=True, exist_ok=True)
    service_file = folder / "service.passwd"
    accounts = [
        (settings.ingest_mqtt_username, settings.ingest_mqtt_password),
        (settings.simulator_mqtt_username, settings.simulator_mqtt_password),
    ]
    text = render_password_file(
        (user, hash_password(password.get_secret_value())) for user, password in accounts
    )
    write_file_atomic(service_file, text)
    out_file = folder / "passwd"
    combine_password_files(
        service_file=service_file, device_file=folder / "devices.passwd", out_file=out_file
    )
    return out_file


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
