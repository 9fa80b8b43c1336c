"""Every service refuses a bad or missing setting (or flag) with one line on stderr and exit 2.

Each service runs as `cityops <service>`, a process of its own with only the variables given:
before `common/service.py`, ingest and the API printed a pydantic traceback (exit 1), rules a
multi-line report, and the simulator argparse's usage text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

CITYOPS = Path(sys.executable).with_name("cityops")
SECRET = "s3cret-never-printed"
BAD = "bad-value-never-printed"

# The required settings of each service, all valid (nothing is connected to: they fail first).
VALID: dict[str, dict[str, str]] = {
    "ingest": {
        "CITYOPS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CITYOPS_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/none",
        "CITYOPS_MQTT_URL": "mqtt://127.0.0.1:1",
        "CITYOPS_INGEST_MQTT_USERNAME": "ingest",
        "CITYOPS_INGEST_MQTT_PASSWORD": SECRET,
    },
    "rules": {
        "CITYOPS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CITYOPS_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/none",
        "CITYOPS_RULES_KAFKA_PASSWORD": SECRET,
    },
    "api": {
        "CITYOPS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CITYOPS_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/none",
        "CITYOPS_API_BOOTSTRAP_KEY": SECRET,
    },
    "simulate": {
        "CITYOPS_MQTT_URL": "mqtt://127.0.0.1:1",
        "CITYOPS_SIMULATOR_MQTT_PASSWORD": SECRET,
    },
}
# One required setting of each, left out.
REQUIRED = {
    "ingest": "CITYOPS_INGEST_MQTT_PASSWORD",
    "rules": "CITYOPS_KAFKA_BOOTSTRAP",
    "api": "CITYOPS_DATABASE_URL",
    "simulate": "CITYOPS_MQTT_URL",
}
# One bad value for each.
INVALID = {
    "ingest": "CITYOPS_INGEST_MAX_IN_FLIGHT",
    "rules": "CITYOPS_RULES_BATCH_MAX",
    "api": "CITYOPS_API_PORT",
    "simulate": "CITYOPS_LOG_LEVEL",
}


def cityops(service: str, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `cityops <service>` with exactly `env` (no CITYOPS_* from this process)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    return subprocess.run(
        [str(CITYOPS), service, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], service: str, *named: str) -> str:
    """rc 2, nothing on stdout, one line on stderr naming `named`, no value repeated."""
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith(f"cityops {service}: "), line
    for name in named:
        assert name in line, line
    assert "Traceback" not in line
    assert SECRET not in line
    assert BAD not in line
    return line


@pytest.mark.parametrize("service", sorted(VALID))
def test_a_missing_setting_is_one_line_naming_it_and_exit_2(service: str) -> None:
    env = {k: v for k, v in VALID[service].items() if k != REQUIRED[service]}
    line = assert_one_line(cityops(service, env), service, REQUIRED[service])
    assert f"{REQUIRED[service]}: required, not set" in line


@pytest.mark.parametrize("service", sorted(VALID))
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(service: str) -> None:
    env = {**VALID[service], INVALID[service]: BAD}
    line = assert_one_line(cityops(service, env), service, INVALID[service])
    assert line.count("CITYOPS_") == 1  # only the bad one: the others are fine


@pytest.mark.parametrize("service", ["ingest", "rules", "api"])
def test_a_services_own_kafka_credential_is_named_as_set(service: str) -> None:
    variable = f"CITYOPS_{service.upper()}_KAFKA_USERNAME"
    env = {**VALID[service], variable: "x" * 300}  # longer than a principal may be
    line = assert_one_line(cityops(service, env), service, variable)
    assert "CITYOPS_KAFKA_USERNAME" not in line


def test_several_problems_are_still_one_line() -> None:
    env = {"CITYOPS_DATABASE_POOL_MAX": BAD, "CITYOPS_SHUTDOWN_TIMEOUT_S": "-1"}
    assert_one_line(
        cityops("rules", env),
        "rules",
        "CITYOPS_KAFKA_BOOTSTRAP",
        "CITYOPS_DATABASE_URL",
        "CITYOPS_DATABASE_POOL_MAX",
        "CITYOPS_SHUTDOWN_TIMEOUT_S",
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--rate", "-3"], "--rate"),
        (["--devices-per-kind", "0"], "--devices-per-kind"),
        (["--faults", "no_such_fault"], "no_such_fault"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_a_bad_simulator_flag_is_one_line_and_exit_2(args: list[str], named: str) -> None:
    assert_one_line(cityops("simulate", VALID["simulate"], *args), "simulate", named)


def test_a_bad_rule_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - id: bin_full\n    priority: P9\n", encoding="utf-8")
    env = {**VALID["rules"], "CITYOPS_RULES_FILE": str(rules)}
    assert_one_line(cityops("rules", env), "rules", "CITYOPS_RULES_FILE", str(rules))


def test_a_flag_error_of_ingest_is_one_line() -> None:
    done = cityops("ingest", VALID["ingest"], "--client-id", "x")
    assert_one_line(done, "ingest", "--client-id only goes with --purge-session")
