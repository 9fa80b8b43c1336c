"""Prometheus configs and rules: promtool accepts them; every alert has a test and a runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
CONFIGS = [PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus.compose.yml"]
RUNBOOK = REPO / "docs" / "operations.md"
SERVICE_JOBS = {"cityops-ingest", "cityops-rules", "cityops-api"}
METRIC_NAME = re.compile(r"^cityops_[a-z]+_[a-z0-9_]+$")


def promtool() -> str:
    """Path of promtool; Debian's `prometheus` package (installed by `cityops stack up`)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make stack-up` (installs Debian's prometheus)")
    return path


def run_promtool(*args: str) -> str:
    completed = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, check=False, cwd=PROMETHEUS
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for path in RULE_FILES
        for group in load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_promtool_accepts_config(config: Path) -> None:
    assert "SUCCESS" in run_promtool("check", "config", str(config))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_config_scrapes_every_service_and_loads_the_rules(config: Path) -> None:
    parsed = load(config)
    jobs = {job["job_name"] for job in parsed["scrape_configs"]}
    assert jobs >= SERVICE_JOBS
    assert "rules/*.yml" in parsed["rule_files"]


def test_promtool_accepts_rules() -> None:
    assert RULE_FILES
    output = run_promtool("check", "rules", *map(str, RULE_FILES))
    assert "FAILED" not in output


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    assert "SUCCESS" in run_promtool("test", "rules", *map(str, RULE_TESTS))


def test_every_rule_file_is_under_test() -> None:
    tested = {
        (path.parent / name).resolve() for path in RULE_TESTS for name in load(path)["rule_files"]
    }
    for path in RULE_FILES:
        if load(path)["groups"]:
            assert path.resolve() in tested, f"{path.name} is not loaded by any promtool test"


def test_every_alert_is_unit_tested_firing() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    fired.add(check["alertname"])
    assert set(alerts()) - fired == set(), "alerts without a firing unit test"


def test_required_alerts_exist() -> None:
    # issue 6: service down, rejects > 5 %, lag growing 5 min, produce errors, P1 past SLA,
    # a district with too many lamps out
    assert {
        "CityopsServiceDown",
        "CityopsIngestRejectingMessages",
        "CityopsConsumerLagGrowing",
        "CityopsKafkaProduceErrors",
        "CityopsP1TicketOverdue",
        "CityopsDistrictLampsOut",
    } <= set(alerts())


@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_has_severity_summary_and_a_runbook(name: str) -> None:
    rule = alerts()[name]
    assert rule["labels"]["severity"] in {"page", "ticket"}
    assert rule["annotations"]["summary"]
    anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
    assert anchor == name.lower()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    assert anchor in headings, f"docs/operations.md has no section '## {name}'"


def test_recording_rules_follow_naming_and_use_no_device_label() -> None:
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                assert "device_id" not in rule["expr"]
                if "record" in rule:
                    level, _metric, operation = rule["record"].split(":")
                    assert level == "cityops" and operation
                for name in re.findall(r"\bcityops_[a-z0-9_]+", rule["expr"]):
                    assert METRIC_NAME.match(name), name
