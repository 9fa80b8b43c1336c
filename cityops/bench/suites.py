"""The per-service benchmarks: found by convention, run N times, never invented.

Convention (agreed with the ingest, rules and API services): `cityops.<service>.bench` has
`run_<service>_bench(env, **options)`, sync or async, where `env` is the stack's `CITYOPS_*`
settings, and it returns a flat dict of measured numbers, its same-run baseline included
(keys with `baseline` in the name, and `ratio_to_baseline`). Options the function does not
accept are not passed. A missing module or function is reported as "not yet implemented".
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cityops.bench.report import SuiteResult

_EXTRA_ATTEMPTS = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceSuite:
    """Where a service's benchmark lives and how to size it."""

    service: str
    title: str
    quick_options: Mapping[str, Any] = field(default_factory=dict)
    full_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module holding the entry point."""
        return f"cityops.{self.service}.bench"

    @property
    def function(self) -> str:
        """The entry point's name."""
        return f"run_{self.service}_bench"


SERVICE_SUITES = (
    ServiceSuite(
        "ingest",
        "Ingest: drain of queued readings, MQTT to Kafka (vs mosquitto_sub | kcat)",
        quick_options={"quick": True, "count": 20_000, "devices": 500},
        full_options={"quick": False},
    ),
    ServiceSuite(
        "rules",
        "Rules: evaluation and ticketing throughput",
        quick_options={"quick": True},
        full_options={"quick": False},
    ),
    ServiceSuite(
        "api",
        "API: read latency and throughput",
        quick_options={"quick": True},
        full_options={"quick": False},
    ),
    ServiceSuite(
        "stack",
        "Broker: RSS with 10,000 connected devices and QoS 1 throughput (the stack's Mosquitto vs "
        "Debian 12's 2.0.11)",
        quick_options={"devices": 2_000, "messages": 20_000},
        full_options={"devices": 10_000, "messages": 100_000},
    ),
)


def find_entry_point(suite: ServiceSuite) -> Callable[..., Any] | None:
    """The suite's function, or None when the service has not written it yet."""
    try:
        module = importlib.import_module(suite.module)
    except ModuleNotFoundError as exc:
        if exc.name in (suite.module, f"cityops.{suite.service}"):
            return None
        raise
    entry = getattr(module, suite.function, None)
    return entry if callable(entry) else None


def accepted_options(entry: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `options` that `entry` takes as keyword arguments."""
    parameters = inspect.signature(entry).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    return {key: value for key, value in options.items() if key in parameters}


async def call_entry(
    entry: Callable[..., Any], env: Mapping[str, str], options: Mapping[str, Any]
) -> dict[str, Any]:
    """Run a sync or async entry point; a sync one runs in a thread, off the event loop."""
    kwargs = accepted_options(entry, options)
    if inspect.iscoroutinefunction(entry):
        result = await entry(dict(env), **kwargs)
    else:
        result = await asyncio.to_thread(entry, dict(env), **kwargs)
    if not isinstance(result, Mapping):
        raise TypeError(f"{entry.__qualname__} returned {type(result).__name__}, not a dict")
    return dict(result)


async def run_service_suite(
    suite: ServiceSuite, env: Mapping[str, str], *, quick: bool, runs: int
) -> SuiteResult:
    """Run one service's benchmark `runs` times; failures are reported, not papered over."""
    source = f"cityops/{suite.service}/bench.py: {suite.function}()"
    entry = find_entry_point(suite)
    if entry is None:
        return SuiteResult(
            suite.service,
            suite.title,
            source,
            status="not yet implemented",
            detail=f"no `{suite.function}` in `{suite.module}` at this commit",
        )
    options = suite.quick_options if quick else suite.full_options
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    # A failed run is reported and replaced by one more attempt (at most two), so the median
    # is still of `runs` measured runs.
    attempts = runs + _EXTRA_ATTEMPTS
    for number in range(1, attempts + 1):
        if len(results) == runs:
            break
        started = time.monotonic()
        log.info("bench %s run %d (%d wanted)", suite.service, number, runs)
        try:
            result = await call_entry(entry, env, options)
        except Exception as exc:  # one failed run is reported; the other runs still go on
            log.exception("bench %s run %d failed", suite.service, number)
            errors.append(f"run {number}: {exc.__class__.__name__}: {exc}")
            continue
        result.setdefault("harness_wall_s", round(time.monotonic() - started, 1))
        results.append(result)
    used = ", ".join(f"{k}={v}" for k, v in accepted_options(entry, options).items())
    notes = [
        f"Called as `{suite.function}(env{', ' + used if used else ''})`, {runs} runs"
        + (f" wanted, {len(results) + len(errors)} attempted." if errors else ".")
    ]
    if errors:
        return SuiteResult(
            suite.service,
            suite.title,
            source,
            runs=results,
            status="failed" if not results else "ok",
            detail="; ".join(errors)[:1000],
            notes=[*notes, *(f"- {e}" for e in errors)],
        )
    return SuiteResult(suite.service, suite.title, source, runs=results, notes=notes)
