"""deploy/systemd/: one unit per server and service, each restarted whenever it exits."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from cityops.stack import broker_build, mosquitto, services

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVERS = ("mosquitto", "kafka", "postgres", "prometheus")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / f"cityops-{name}.service", encoding="utf-8")
    return parser


def _service_names() -> list[str]:
    return [s.name for s in services.SERVICES if s.ready_url is not None]


@pytest.mark.parametrize("name", [*SERVERS, *_service_names()])
def test_every_unit_restarts_always_and_gives_up_on_a_loop(name: str) -> None:
    unit = _unit(name)
    assert unit["Service"]["Restart"] == "always", name
    assert unit["Service"]["RestartSec"] == "1"
    assert unit["Unit"]["StartLimitBurst"] == "5"


def test_the_broker_unit_runs_the_stacks_build_with_a_file_limit_for_a_city() -> None:
    service = _unit("mosquitto")["Service"]
    assert service["ExecStart"].split()[0] == str(broker_build.BINARY)
    assert service["ExecStart"].split()[0] == mosquitto.BINARY
    assert int(service["LimitNOFILE"]) >= 100_000


@pytest.mark.parametrize("name", _service_names())
def test_service_units_run_the_cli_with_the_settings_file(name: str) -> None:
    service = _unit(name)["Service"]
    args = next(s.args for s in services.SERVICES if s.name == name)
    assert service["ExecStart"] == f"/opt/cityops/venv/bin/cityops {' '.join(args)}"
    assert service["EnvironmentFile"] == "/etc/cityops/cityops.env"
