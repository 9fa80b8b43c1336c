"""Every benchmark suite, registered by name with the options it takes.

A suite's `run(env, **options)` (sync or async; `env` is the stack's `CITYOPS_*` settings)
returns a flat dict of measured numbers, its same-run baseline included (keys with `baseline`
in the name, and `ratio_to_baseline`). The options a suite takes are declared here with their
types; its quick and full sizes, and every `--set suite.option=value` of the command line, are
checked against that declaration: an option a suite does not declare is an error, never
silently dropped. A test checks that each declaration matches its function's signature.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bench import api, broker, e2e, ingest, rules
from bench.report import SuiteResult

_EXTRA_ATTEMPTS = 2
log = logging.getLogger(__name__)

OptionType = type[bool] | type[int] | type[float] | type[str]


class OptionError(ValueError):
    """An option a suite does not declare, or a value of the wrong type."""


@dataclass(frozen=True, slots=True)
class Suite:
    """One benchmark: its entry point, the options it takes and its two sizes.

    `repeated` suites are called once per run and the harness takes medians; a suite that is
    not repeated (the end-to-end one) measures its own windows under one load and returns its
    `SuiteResult` itself, given `runs` and `quick`.
    """

    name: str
    title: str
    run: Callable[..., Any]
    options: Mapping[str, OptionType] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)
    full: Mapping[str, Any] = field(default_factory=dict)
    repeated: bool = True
    targets: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # key -> (op, bound)

    def __post_init__(self) -> None:
        for sizes in (self.quick, self.full):
            for option, value in sizes.items():
                self.check(option, value)

    @property
    def source(self) -> str:
        """Where the suite's code is, for the report."""
        module = self.run.__module__.replace(".", "/")
        return f"{module}.py: {self.run.__name__}()"

    def check(self, option: str, value: Any) -> None:
        """Raise `OptionError` unless `option` is declared and `value` has its type."""
        wanted = self.options.get(option)
        if wanted is None:
            declared = ", ".join(sorted(self.options)) or "none"
            raise OptionError(f"suite {self.name!r} has no option {option!r} (options: {declared})")
        ok = isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool))
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise OptionError(
                f"suite {self.name!r}: option {option!r} takes {wanted.__name__}, not {value!r}"
            )

    def sizes(self, *, quick: bool, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options of one run: the quick or full sizes, then the overrides (checked)."""
        chosen = dict(self.quick if quick else self.full)
        for option, value in (overrides or {}).items():
            self.check(option, value)
            chosen[option] = value
        return chosen


def parse_value(text: str, wanted: OptionType) -> Any:
    """A command-line value as the declared type (`true`/`false` for booleans)."""
    if wanted is bool:
        if text.lower() in ("true", "yes", "1"):
            return True
        if text.lower() in ("false", "no", "0"):
            return False
        raise OptionError(f"{text!r} is not a boolean (true or false)")
    try:
        return wanted(text)
    except ValueError:
        raise OptionError(f"{text!r} is not {wanted.__name__}") from None


def parse_overrides(items: list[str], suites: Mapping[str, Suite]) -> dict[str, dict[str, Any]]:
    """`suite.option=value` items -> {suite: {option: value}}; anything unknown is an error."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        name, dot, option = target.partition(".")
        if not sep or not dot or not option:
            raise OptionError(f"{item!r}: expected suite.option=value")
        suite = suites.get(name)
        if suite is None:
            raise OptionError(f"{item!r}: no suite {name!r} (suites: {', '.join(suites)})")
        wanted = suite.options.get(option)
        if wanted is None:
            suite.check(option, text)  # raises, naming the declared options
            continue
        overrides.setdefault(name, {})[option] = parse_value(text, wanted)
    return overrides


SUITES: tuple[Suite, ...] = (
    Suite(
        "ingest",
        "Ingest: drain of queued readings, MQTT to Kafka (vs mosquitto_sub | kcat)",
        ingest.run_ingest_bench,
        options={
            "count": int,
            "devices": int,
            "protocol": str,
            "baseline": bool,
            "timeout_s": float,
            "replicas": int,
        },
        quick={"count": 20_000, "devices": 500},
    ),
    Suite(
        "rules",
        "Rules: evaluation and ticketing throughput",
        rules.run_rules_bench,
        options={"quick": bool, "timeout_s": float},
        quick={"quick": True},
        full={"quick": False},
    ),
    Suite(
        "api",
        "API: read latency and throughput",
        api.run_api_bench,
        options={"quick": bool, "devices": int, "rate": float, "duration_s": float},
        quick={"quick": True},
        full={"quick": False},
        targets={"import_health_max_ms": ("<=", 100.0)},
    ),
    Suite(
        "stack",
        "Broker: RSS with 10,000 connected devices and QoS 1 throughput (the stack's Mosquitto vs "
        "Debian 12's 2.0.11)",
        broker.run_stack_bench,
        options={"devices": int, "messages": int},
        quick={"devices": 2_000, "messages": 20_000},
        full={"devices": 10_000, "messages": 100_000},
    ),
    Suite(
        "e2e",
        "End to end: sensor publish -> state / ticket visible in the API",
        e2e.run_e2e_suite,
        options={
            "devices_per_kind": int,
            "rate": float,
            "warmup_s": float,
            "window_s": float,
            "probe_bins": int,
        },
        repeated=False,
    ),
)
BY_NAME: dict[str, Suite] = {suite.name: suite for suite in SUITES}


async def call_entry(
    entry: Callable[..., Any], env: Mapping[str, str], options: Mapping[str, Any]
) -> dict[str, Any]:
    """Run a sync or async entry point; a sync one runs in a thread, off the event loop."""
    if inspect.iscoroutinefunction(entry):
        result = await entry(dict(env), **options)
    else:
        result = await asyncio.to_thread(entry, dict(env), **options)
    if not isinstance(result, Mapping):
        raise TypeError(f"{entry.__qualname__} returned {type(result).__name__}, not a dict")
    return dict(result)


async def run_suite(
    suite: Suite,
    env: Mapping[str, str],
    *,
    quick: bool,
    runs: int,
    overrides: Mapping[str, Any] | None = None,
) -> SuiteResult:
    """Run one suite: `runs` times for a repeated one; failures are reported, not papered over."""
    options = suite.sizes(quick=quick, overrides=overrides)
    if not suite.repeated:
        result: SuiteResult = await suite.run(env, quick=quick, runs=runs, **options)
        return result
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    # A failed run is reported and replaced by one more attempt (at most two), so the median
    # is still of `runs` measured runs.
    attempts = runs + _EXTRA_ATTEMPTS
    for number in range(1, attempts + 1):
        if len(results) == runs:
            break
        started = time.monotonic()
        log.info("bench %s run %d (%d wanted)", suite.name, number, runs)
        try:
            result_run = await call_entry(suite.run, env, options)
        except Exception as exc:  # one failed run is reported; the other runs still go on
            log.exception("bench %s run %d failed", suite.name, number)
            errors.append(f"run {number}: {exc.__class__.__name__}: {exc}")
            continue
        result_run.setdefault("harness_wall_s", round(time.monotonic() - started, 1))
        results.append(result_run)
    used = ", ".join(f"{k}={v}" for k, v in options.items())
    notes = [
        f"Called as `{suite.run.__name__}(env{', ' + used if used else ''})`, {runs} runs"
        + (f" wanted, {len(results) + len(errors)} attempted." if errors else ".")
    ]
    if errors:
        return SuiteResult(
            suite.name,
            suite.title,
            suite.source,
            runs=results,
            status="failed" if not results else "ok",
            detail="; ".join(errors)[:1000],
            notes=[*notes, *(f"- {e}" for e in errors)],
            targets=suite.targets,
        )
    return SuiteResult(
        suite.name, suite.title, suite.source, runs=results, notes=notes, targets=suite.targets
    )
