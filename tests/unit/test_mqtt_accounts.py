"""The compose init step writes hashed service accounts the broker can verify."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from cityops.common.mqtt_accounts import ServiceAccountSettings, write_service_accounts
from cityops.common.mqtt_auth import parse_password_file, verify_password


def test_service_accounts_are_hashed_and_merged_with_devices(tmp_path: Path) -> None:
    (tmp_path / "devices.passwd").write_text("wb-0001:$7$101$AAAA$BBBB\n", encoding="utf-8")
    settings = ServiceAccountSettings(
        ingest_mqtt_password=SecretStr("ingest-secret"),
        simulator_mqtt_password=SecretStr("gateway-secret"),
    )
    out = write_service_accounts(settings, tmp_path)
    entries = parse_password_file(out.read_text(encoding="utf-8"))
    assert set(entries) == {"ingest", "gateway", "wb-0001"}
    assert verify_password("ingest-secret", entries["ingest"])
    assert verify_password("gateway-secret", entries["gateway"])
    assert not verify_password("gateway-secret", entries["ingest"])
    assert "ingest-secret" not in out.read_text(encoding="utf-8")
