"""Import parsing: valid rows kept, every bad row reported with its field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.api.devices.credentials import BrokerFiles, apply_to_files, new_password, parse_import
from cityops.common import mqtt_auth


def test_csv_rows_keep_the_good_and_report_the_bad() -> None:
    text = (
        "device_id,kind,district,lat,lon,enabled,metadata\n"
        "wb-1,wastebin,north,52.1,13.1,true,\n"
        'wb-2,wastebin,north,,,no,"{""zone"": 1}"\n'
        "x,wastebin,north,,,,\n"
        "wb-3,wastebin,north,52.1,,,\n"
        "wb-4,wastebin,north,,,maybe,\n"
        "wb-1,parking,north,,,,\n"
        "wb-5,wastebin,north,,,,{broken\n"
    )
    parsed = parse_import(text, fmt="csv", max_rows=100)
    assert [d.device_id for d in parsed.devices] == ["wb-1", "wb-2"]
    assert parsed.rows == [1, 2]
    assert parsed.devices[1].enabled is False
    assert parsed.devices[1].metadata == {"zone": 1}
    assert [(row, errors[0][0]) for row, _, errors in parsed.errors] == [
        (3, "device_id"),
        (4, "body"),  # lat without lon: a model-level error
        (5, "row"),
        (6, "device_id"),
        (7, "row"),
    ]


def test_csv_header_must_name_known_columns() -> None:
    with pytest.raises(ValueError, match="header"):
        parse_import("kind\nwastebin\n", fmt="csv", max_rows=10)
    with pytest.raises(ValueError, match="unknown CSV columns: colour"):
        parse_import("device_id,kind,colour\n", fmt="csv", max_rows=10)


def test_json_lines() -> None:
    text = '{"device_id": "pk-1", "kind": "parking"}\n\nnot json\n{"device_id": "pk-2"}\n'
    parsed = parse_import(text, fmt="jsonl", max_rows=10)
    assert [d.device_id for d in parsed.devices] == ["pk-1"]
    assert [(row, device_id) for row, device_id, _ in parsed.errors] == [(2, None), (3, "pk-2")]
    assert parsed.errors[1][2][0][0] == "kind"


def test_row_limit() -> None:
    text = "".join(f'{{"device_id": "pk-{i}", "kind": "parking"}}\n' for i in range(11))
    with pytest.raises(ValueError, match="more than 10"):
        parse_import(text, fmt="jsonl", max_rows=10)


def test_broker_files_are_edited_not_replaced(tmp_path: Path) -> None:
    files = BrokerFiles.from_settings(device_file=tmp_path / "devices.passwd", lock_file=None)
    assert files is not None
    assert files.lock_file == tmp_path / "passwd.lock"
    files.device_file.write_text(f"foreign-1:{mqtt_auth.hash_password('f')}\n")
    assert apply_to_files(files, {"wb-1": mqtt_auth.hash_password("p"), "foreign-1": None})
    assert apply_to_files(files, {"wb-2": mqtt_auth.hash_password(new_password())})
    entries = mqtt_auth.parse_password_file(files.device_file.read_text())
    assert set(entries) == {"wb-1", "wb-2"}
    assert mqtt_auth.verify_password("p", entries["wb-1"])
    assert not apply_to_files(files, {"foreign-1": None})  # nothing to change: not rewritten


def test_no_device_file_means_credentials_live_only_in_the_database() -> None:
    assert BrokerFiles.from_settings(device_file=None) is None
