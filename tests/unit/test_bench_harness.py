"""The benchmark harness: statistics, discovery of service benchmarks, the report."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cityops.bench.machine import cpu_model, memory_gib, os_name
from cityops.bench.main import load_env
from cityops.bench.report import BenchReport, SuiteResult, format_value, render
from cityops.bench.stats import median_of_runs, percentile, ratio
from cityops.bench.suites import (
    ServiceSuite,
    accepted_options,
    call_entry,
    find_entry_point,
    run_service_suite,
)


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


def test_a_missing_service_benchmark_is_reported_not_invented() -> None:
    suite = ServiceSuite("nosuchservice", "Nothing")
    assert find_entry_point(suite) is None


@pytest.fixture
def fake_bench(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("cityops.fakesvc.bench")

    async def run_fakesvc_bench(env: dict[str, str], *, quick: bool = False) -> dict[str, Any]:
        calls.append({"env": env, "quick": quick})
        if len(calls) == 2:
            raise RuntimeError("broker went away")
        return {"events_per_s": 1000.0 * len(calls), "baseline_events_per_s": 4000.0}

    module.run_fakesvc_bench = run_fakesvc_bench  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cityops.fakesvc.bench", module)
    return module


async def test_a_failed_run_is_listed_and_replaced(fake_bench: types.ModuleType) -> None:
    suite = ServiceSuite("fakesvc", "Fake", quick_options={"quick": True, "count": 5})
    result = await run_service_suite(suite, {"CITYOPS_X": "1"}, quick=True, runs=3)
    assert result.status == "ok"
    # three measured runs for the median: the failed second attempt was followed by a fourth
    assert [run["events_per_s"] for run in result.runs] == [1000.0, 3000.0, 4000.0]
    assert len(fake_bench.calls) == 4
    assert "run 2: RuntimeError: broker went away" in result.detail
    assert "3 runs wanted, 4 attempted." in result.notes[0]
    # only the options the function accepts were passed
    assert fake_bench.calls[0] == {"env": {"CITYOPS_X": "1"}, "quick": True}


async def test_sync_entry_points_run_in_a_thread() -> None:
    def run_sync(env: dict[str, str], count: int = 1) -> dict[str, Any]:
        return {"count": count, "keys": len(env)}

    assert accepted_options(run_sync, {"count": 3, "quick": True}) == {"count": 3}
    assert await call_entry(run_sync, {"A": "b"}, {"count": 3, "quick": True}) == {
        "count": 3,
        "keys": 1,
    }

    def not_a_dict(env: dict[str, str]) -> list[int]:
        return [1]

    with pytest.raises(TypeError, match="not a dict"):
        await call_entry(not_a_dict, {}, {})


def test_report_marks_targets_and_unimplemented_suites() -> None:
    report = BenchReport(
        generated_at="2026-11-26T12:00:00+00:00",
        command="cityops bench --quick",
        mode="quick",
        machine={"cores": 2},
        versions={"Kafka": "4.1.1"},
        suites=[
            SuiteResult(
                "e2e",
                "End to end",
                "cityops/bench/e2e.py",
                runs=[{"state_p99_ms": 80.0}, {"state_p99_ms": 120.0}, {"state_p99_ms": 90.0}],
                targets={"state_p99_ms": ("<=", 100.0)},
            ),
            SuiteResult(
                "api", "API", "cityops/api/bench.py", status="not yet implemented", detail="none"
            ),
        ],
        duration_s=12.0,
    )
    text = render(report)
    assert "| `state_p99_ms` | 90 | 80 | 120 | 90 | meets target <= 100 |" in text
    assert "**not yet implemented**: none" in text
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
