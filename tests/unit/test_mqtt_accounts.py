"""The compose init step writes hashed service accounts the broker's auth plugin can verify."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from cityops.common.mqtt_accounts import ServiceAccountSettings, write_service_accounts
from cityops.common.mqtt_auth import parse_password_file, verify_password


def _settings() -> ServiceAccountSettings:
    return ServiceAccountSettings(
        ingest_mqtt_password=SecretStr("ingest-secret"),
        simulator_mqtt_password=SecretStr("gateway-secret"),
        dispatcher_mqtt_password=SecretStr("dispatcher-secret"),
    )


def test_service_accounts_are_hashed_and_devices_left_alone(tmp_path: Path) -> None:
    devices = tmp_path / "devices.passwd"
    devices.write_text("wb-0001:$7$101$AAAA$BBBB\n", encoding="utf-8")
    out = write_service_accounts(_settings(), tmp_path)
    assert out == tmp_path / "service.passwd"
    entries = parse_password_file(out.read_text(encoding="utf-8"))
    assert set(entries) == {"ingest", "gateway", "dispatcher"}
    assert verify_password("ingest-secret", entries["ingest"])
    assert verify_password("gateway-secret", entries["gateway"])
    assert verify_password("dispatcher-secret", entries["dispatcher"])
    assert not verify_password("gateway-secret", entries["ingest"])
    assert "ingest-secret" not in out.read_text(encoding="utf-8")
    assert devices.read_text(encoding="utf-8") == "wb-0001:$7$101$AAAA$BBBB\n"


def test_an_empty_devices_file_is_created_for_the_broker(tmp_path: Path) -> None:
    write_service_accounts(_settings(), tmp_path)
    assert (tmp_path / "devices.passwd").read_text(encoding="utf-8") == ""
