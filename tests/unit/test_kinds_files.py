"""Kind files: a wrong one is refused with one line naming the file, the kind and the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cityops.common.service import ConfigError
from cityops.kinds.catalog import load_kinds, shipped_kinds, shipped_kinds_dir
from cityops.kinds.main import main as kinds_main
from cityops.kinds.spec import KindFileError
from cityops.kinds.startup import load_configured_kinds

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
version: 1
name: beacon
title: beacon
description: A test beacon's reading.
reporting_interval_s: 60
smart_data_model: DeviceMeasurement
fields:
  level_pct:
    type: number
    unit: "%"
    min: 0
    max: 100
    description: A level.
    smart_data_model: {attribute: numValue, controlled_property: level}
  mode:
    type: enum
    values: [idle, busy]
    description: What it does.
    smart_data_model: {model: Device, attribute: deviceState}
simulator:
  id_prefix: bc
"""


def smart_data_models_dir() -> Path:
    """The Smart Data Model schemas beside the checkout (../shared/smart-data-models)."""
    if configured := os.environ.get("CITYOPS_SMART_DATA_MODELS_DIR"):
        return Path(configured)
    for parent in REPO.parents:
        if (parent / "shared" / "smart-data-models" / "Streetlight" / "schema.json").is_file():
            return parent / "shared" / "smart-data-models"
    raise AssertionError("no shared/smart-data-models above the checkout; set the setting")


def write(folder: Path, text: str, name: str = "beacon") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path: Path, text: str, *, models: Path | None = None) -> KindFileError:
    write(tmp_path, text)
    with pytest.raises(KindFileError) as caught:
        load_kinds(tmp_path, models_dir=models)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "beacon.yaml")), message
    return caught.value


def test_a_good_file_loads(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    catalog = load_kinds(tmp_path, models_dir=smart_data_models_dir())
    assert catalog.names == ("beacon",)
    spec = catalog.spec("beacon")
    assert spec.field_names == ("level_pct", "mode")
    assert spec.reporting_interval_s == 60
    assert spec.field("mode") is not None
    reading = catalog.parse_reading(
        b'{"device_id":"bc-1","kind":"beacon","ts":"2026-11-26T08:15:00Z","seq":1,"mode":"idle"}'
    )
    assert reading.kind == "beacon"


def test_the_shipped_kinds_map_to_real_smart_data_model_attributes() -> None:
    catalog = load_kinds(None, models_dir=smart_data_models_dir())
    assert set(catalog.names) == {"streetlight", "manhole", "wastebin", "parking"}


def test_deploy_kinds_is_the_shipped_folder() -> None:
    assert (REPO / "deploy" / "kinds").resolve() == shipped_kinds_dir().resolve()
    assert shipped_kinds().folder == str(shipped_kinds_dir())


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("type: number\n    unit", "type: decimal\n    unit"), "level_pct", "unknown type"),
        (("max: 100", "max: -1"), "level_pct", "min 0 > max -1"),
        (
            (
                "  mode:\n",
                "  level_pct:\n    type: bool\n    description: x\n"
                "    smart_data_model: {attribute: numValue}\n  mode:\n",
            ),
            "level_pct",
            "twice",
        ),
        (("values: [idle, busy]", "values: [idle, idle]"), "mode", "listed twice"),
        (("type: enum\n    values: [idle, busy]\n", "type: enum\n"), "mode", "values"),
        (("    max: 100\n", "    max: 100\n    max_length: 3\n"), "level_pct", "max_length"),
        (("level_pct:", "Level:"), "Level", "bad field name"),
        (("level_pct:", "seq:"), "seq", "already"),
        (("    description: A level.\n", ""), "level_pct", "missing required keys ['description']"),
        (
            ("    smart_data_model: {attribute: numValue, controlled_property: level}\n", ""),
            "level_pct",
            "smart_data_model",
        ),
        (("min: 0", "min: '0'"), "level_pct", "a number"),
    ],
)
def test_field_errors_name_file_kind_and_field(
    tmp_path: Path, change: tuple[str, str], field: str, words: str
) -> None:
    assert change[0] in GOOD
    error = refusal(tmp_path, GOOD.replace(*change, 1))
    assert error.kind == "beacon"
    assert error.field_name == field
    assert f"kind 'beacon', field {field!r}" in str(error)
    assert words in str(error)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("name: beacon", "name: Beacon"), "bad name"),
        (("name: beacon", "name: lamp"), "bad name"),
        (("reporting_interval_s: 60\n", ""), "missing required keys ['reporting_interval_s']"),
        (("title: beacon\n", ""), "missing required keys ['title']"),
        (("reporting_interval_s: 60", "reporting_interval_s: 0"), "reporting_interval_s"),
        (("version: 1", "version: 2"), "version"),
        (("simulator:", "simulater:"), "unknown keys ['simulater']"),
        (("fields:", "fields: {}\nx:"), "unknown keys"),
        (("description: A test", "description: [A test"), "not valid YAML"),
    ],
)
def test_file_errors_name_the_file(tmp_path: Path, change: tuple[str, str], words: str) -> None:
    assert change[0] in GOOD
    error = refusal(tmp_path, GOOD.replace(*change, 1))
    assert words in str(error)


def test_unknown_smart_data_model_attribute(tmp_path: Path) -> None:
    text = GOOD.replace("attribute: numValue", "attribute: numberValue")
    write(tmp_path, text)
    load_kinds(tmp_path)  # without the models folder only the form is checked
    error = refusal(tmp_path, text, models=smart_data_models_dir())
    assert error.field_name == "level_pct"
    assert "'numberValue' is not an attribute of Smart Data Model 'DeviceMeasurement'" in str(error)


def test_unknown_smart_data_model(tmp_path: Path) -> None:
    error = refusal(
        tmp_path, GOOD.replace("model: Device,", "model: Gadget,"), models=smart_data_models_dir()
    )
    assert error.field_name == "mode"
    assert "no schema for Smart Data Model 'Gadget'" in str(error)


def test_attributes_of_the_common_schema_count(tmp_path: Path) -> None:
    # `location` comes into AirQualityObserved from the common schema's Location-Commons
    text = GOOD.replace("{attribute: numValue,", "{model: AirQualityObserved, attribute: name,")
    write(tmp_path, text)
    load_kinds(tmp_path, models_dir=smart_data_models_dir())


def test_a_file_named_yml_is_refused_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "beacon.yml").write_text(GOOD, encoding="utf-8")
    with pytest.raises(KindFileError, match=r"kind files end in \.yaml"):
        load_kinds(tmp_path)


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KindFileError, match="no kind files"):
        load_kinds(tmp_path)


def test_two_kinds_cannot_share_a_simulator_prefix(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace("name: beacon", "name: buoy"), name="buoy")
    with pytest.raises(KindFileError, match="id_prefix 'bc'"):
        load_kinds(tmp_path)


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, GOOD)
    assert kinds_main(["--check", "--dir", str(tmp_path)]) == 0
    assert "1 kinds OK (beacon)" in capsys.readouterr().out
    write(tmp_path, GOOD.replace("max: 100", "max: -1"))
    assert kinds_main(["--check", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "beacon.yaml: kind 'beacon', field 'level_pct': min 0 > max -1" in err


def test_service_start_refuses_a_bad_kind_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, GOOD.replace("type: enum", "type: choice"))
    monkeypatch.setenv("CITYOPS_KINDS_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_configured_kinds()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("bad kind file: ")
    assert "kind 'beacon', field 'mode': type: unknown type 'choice'" in message


@pytest.mark.parametrize("service", ["ingest", "rules", "api", "simulate"])
def test_every_service_refuses_a_bad_kind_file_at_start(tmp_path: Path, service: str) -> None:
    write(tmp_path, GOOD.replace("name: beacon", "name: beacon\nname: beacon"))
    env = {**os.environ, "CITYOPS_KINDS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "cityops.cli", service],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"cityops {service}: bad kind file: " in lines[0]
    assert "key 'name' given twice" in lines[0]


EXTRAS = """\
kpis:
  - {id: busy_share, title: Beacons busy, measure: share, unit: "%", where: mode == busy}
  - {id: level, title: Mean level, measure: mean, field: level_pct}
dashboard:
  panels:
    - {title: Level, type: timeseries, fields: [level_pct]}
    - {title: Busy, type: stat, kpi: busy_share}
"""
GENERIC_SIMULATOR = """\
  behaviour: generic
  fields:
    level_pct: {mean: 40, spread: 5, daily: {amplitude: 10, peaks_h: [8, 18]}}
    mode: {weights: {idle: 3, busy: 1}}
"""


def test_kpis_dashboard_and_simulator_parameters_are_read(tmp_path: Path) -> None:
    write(tmp_path, GOOD + GENERIC_SIMULATOR + EXTRAS)
    spec = load_kinds(tmp_path).spec("beacon")
    assert [k.id for k in spec.kpis] == ["busy_share", "level"]
    assert str(spec.kpis[0].where[0]) == "mode == busy"
    assert spec.kpis[1].field == "level_pct"
    assert [p.kpi for p in spec.panels] == [None, "busy_share"]
    level = spec.simulator.fields["level_pct"]
    assert (level.mean, level.daily_amplitude, level.daily_peaks_h) == (40.0, 10.0, (8.0, 18.0))
    assert spec.simulator.fields["mode"].weights == {"idle": 3.0, "busy": 1.0}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("where: mode == busy", "where: mood == busy"), "unknown field 'mood'"),
        (("where: mode == busy", "where: mode == asleep"), "'asleep' is not one of"),
        (("field: level_pct}", "field: mode}"), "is not a number of this kind"),
        (("kpi: busy_share", "kpi: nothing"), "'nothing' is not a KPI of this kind"),
        (("type: timeseries", "type: pie"), "dashboard.panels[0].type"),
        (("mean: 40", "mean: 140"), "outside the field's range"),
        (("peaks_h: [8, 18]", "peaks_h: [8, 25]"), "hours 0 to 24"),
        (("idle: 3", "asleep: 3"), "'asleep' is not one of"),
    ],
)
def test_kpi_dashboard_and_simulator_errors(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    text = GOOD + GENERIC_SIMULATOR + EXTRAS
    assert change[0] in text
    error = refusal(tmp_path, text.replace(*change, 1))
    assert error.kind == "beacon"
    assert words in str(error)
