"""The benchmark harness: statistics, the suites' registration and options, the report."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.cli import load_env
from bench.machine import cpu_model, memory_gib, os_name
from bench.registry import (
    BY_NAME,
    SUITES,
    OptionError,
    Suite,
    call_entry,
    parse_overrides,
    run_suite,
)
from bench.report import BenchReport, SuiteResult, format_value, render
from bench.stats import median_of_runs, percentile, ratio

REPO = Path(__file__).resolve().parents[2]


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q"):
        percentile(values, 101)


def test_median_of_runs_skips_missing_keys_and_keeps_text() -> None:
    runs = [
        {"msgs_per_s": 100, "mode": "3.1.1", "error": "x"},
        {"msgs_per_s": 300, "mode": "3.1.1"},
        {"msgs_per_s": 200, "mode": "3.1.1", "p99": 5.0},
    ]
    summary = median_of_runs(runs)
    assert summary == {"msgs_per_s": 200, "mode": "3.1.1", "error": "x", "p99": 5.0}
    assert median_of_runs([{"flag": True}, {"flag": False}])["flag"] is True  # not a number
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(1.0, 0.0) is None


def test_format_value() -> None:
    assert format_value(12345) == "12,345"
    assert format_value(0.01234) == "0.0123"
    assert format_value(42.25) == "42.2"
    assert format_value(None) == "—"
    assert format_value("a|b") == "a\\|b"


def test_each_declaration_matches_its_functions_keyword_options() -> None:
    # what the harness may pass is declared once; a declaration that drifts from its function
    # (an option renamed or removed there) fails here, not silently in `make bench`
    for suite in SUITES:
        parameters = inspect.signature(suite.run).parameters
        keyword = {n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        supplied = set() if suite.repeated else {"quick", "runs"}  # by the harness itself
        assert set(suite.options) <= keyword - supplied, suite.name
        assert supplied <= keyword, suite.name
        for name in keyword - set(suite.options) - supplied:  # for callers in Python only
            assert parameters[name].default is not inspect.Parameter.empty, (suite.name, name)
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    assert list(BY_NAME) == ["ingest", "rules", "api", "stack", "e2e"]


def test_an_undeclared_option_is_an_error_not_dropped() -> None:
    def run(env: dict[str, str], *, count: int = 1) -> dict[str, Any]:
        return {"count": count}

    with pytest.raises(OptionError, match="has no option 'quick'"):
        Suite("s", "S", run, options={"count": int}, quick={"quick": True})
    with pytest.raises(OptionError, match="takes int"):
        Suite("s", "S", run, options={"count": int}, full={"count": "many"})
    with pytest.raises(OptionError, match="takes int"):
        Suite("s", "S", run, options={"count": int}, full={"count": True})
    suite = Suite("s", "S", run, options={"count": int, "rate": float}, quick={"count": 5})
    assert suite.sizes(quick=True, overrides={"rate": 2}) == {"count": 5, "rate": 2}
    with pytest.raises(OptionError, match="options: count, rate"):
        suite.sizes(quick=False, overrides={"cuont": 3})


def test_command_line_overrides_are_parsed_as_declared() -> None:
    assert parse_overrides(["ingest.count=5000", "ingest.baseline=false"], BY_NAME) == {
        "ingest": {"count": 5000, "baseline": False}
    }
    assert parse_overrides(["api.rate=50"], BY_NAME) == {"api": {"rate": 50.0}}
    for bad, message in (
        ("ingest.cuont=5", "has no option 'cuont'"),
        ("nosuch.count=5", "no suite 'nosuch'"),
        ("ingest.count=many", "is not int"),
        ("ingest.baseline=maybe", "not a boolean"),
        ("ingest=5", "expected suite.option=value"),
    ):
        with pytest.raises(OptionError, match=message):
            parse_overrides([bad], BY_NAME)


def test_an_unknown_option_on_the_command_line_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--set", "ingest.cuont=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "suite 'ingest' has no option 'cuont'" in result.stderr


async def test_a_failed_run_is_listed_and_replaced() -> None:
    calls: list[dict[str, Any]] = []

    async def run_fake(env: dict[str, str], *, count: int = 0) -> dict[str, Any]:
        calls.append({"env": env, "count": count})
        if len(calls) == 2:
            raise RuntimeError("broker went away")
        return {"events_per_s": 1000.0 * len(calls), "baseline_events_per_s": 4000.0}

    suite = Suite("fake", "Fake", run_fake, options={"count": int}, quick={"count": 5})
    result = await run_suite(suite, {"CITYOPS_X": "1"}, quick=True, runs=3)
    assert result.status == "ok"
    # three measured runs for the median: the failed second attempt was followed by a fourth
    assert [run["events_per_s"] for run in result.runs] == [1000.0, 3000.0, 4000.0]
    assert len(calls) == 4
    assert "run 2: RuntimeError: broker went away" in result.detail
    assert "3 runs wanted, 4 attempted." in result.notes[0]
    assert "`run_fake(env, count=5)`" in result.notes[0]
    assert calls[0] == {"env": {"CITYOPS_X": "1"}, "count": 5}
    assert result.source.endswith("test_bench_harness.py: run_fake()")


async def test_sync_entry_points_run_in_a_thread() -> None:
    def run_sync(env: dict[str, str], count: int = 1) -> dict[str, Any]:
        return {"count": count, "keys": len(env)}

    assert await call_entry(run_sync, {"A": "b"}, {"count": 3}) == {"count": 3, "keys": 1}

    def not_a_dict(env: dict[str, str]) -> list[int]:
        return [1]

    with pytest.raises(TypeError, match="not a dict"):
        await call_entry(not_a_dict, {}, {})


def test_report_marks_targets_and_failed_suites() -> None:
    report = BenchReport(
        generated_at="2026-11-26T12:00:00+00:00",
        command="python -m bench --quick",
        mode="quick",
        machine={"cores": 2},
        versions={"Kafka": "4.1.1"},
        suites=[
            SuiteResult(
                "e2e",
                "End to end",
                "bench/e2e.py",
                runs=[{"state_p99_ms": 80.0}, {"state_p99_ms": 120.0}, {"state_p99_ms": 90.0}],
                targets={"state_p99_ms": ("<=", 100.0)},
            ),
            SuiteResult("api", "API", "bench/api.py", status="failed", detail="no database"),
        ],
        duration_s=12.0,
    )
    text = render(report)
    assert "| `state_p99_ms` | 90 | 80 | 120 | 90 | meets target <= 100 |" in text
    assert "**failed**: no database" in text
    assert "| cores | 2 |" in text and "| Kafka | 4.1.1 |" in text
    missed = SuiteResult("e2e", "E", "s", runs=[{"p": 300.0}] * 3, targets={"p": ("<=", 250.0)})
    assert "MISSES target <= 250" in render(BenchReport("t", "c", "m", {}, {}, [missed], 1.0))


def test_machine_facts_are_parsed_from_proc() -> None:
    assert cpu_model("processor : 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"
    assert memory_gib("MemTotal:       24634040 kB\n") == 23.5
    assert (
        os_name('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
        == "Debian GNU/Linux 12 (bookworm)"
    )
    assert cpu_model("") == "unknown" and memory_gib("") is None


def test_environment_overrides_the_stack_file(tmp_path: Path) -> None:
    env_file = tmp_path / "cityops.env"
    env_file.write_text("CITYOPS_MQTT_URL=mqtt://127.0.0.1:1883\nCITYOPS_X=file\n")
    env = load_env(env_file, {"CITYOPS_X": "env", "HOME": "/root"})
    assert env == {"CITYOPS_MQTT_URL": "mqtt://127.0.0.1:1883", "CITYOPS_X": "env"}
    assert load_env(tmp_path / "missing.env", {}) == {}
