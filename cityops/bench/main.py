"""`cityops bench [--quick] [--out docs/benchmarks.md]`: run every benchmark, write the report.

The stack must be up (`make bench` starts it). Settings come from `.stack/cityops.env`, with
`CITYOPS_*` environment variables taking precedence.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cityops.bench import e2e
from cityops.bench.machine import machine_facts, versions
from cityops.bench.report import BenchReport, SuiteResult, render
from cityops.bench.stats import is_number
from cityops.bench.suites import SERVICE_SUITES, run_service_suite
from cityops.common.logs import configure_logging
from cityops.common.settings import BaseServiceSettings
from cityops.stack.credentials import parse_env_file

log = logging.getLogger("cityops.bench")

SUITES = ("ingest", "rules", "api", "stack", "e2e")
E2E_TARGETS = {"state_p99_ms": ("<=", 100.0), "ticket_p99_ms": ("<=", 250.0)}
MIN_RUNS = 3


def load_env(env_file: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The stack's settings file overlaid with `CITYOPS_*` variables from the environment."""
    values = parse_env_file(env_file.read_text(encoding="utf-8")) if env_file.exists() else {}
    values.update({k: v for k, v in environ.items() if k.startswith("CITYOPS_")})
    return values


def build_parser() -> argparse.ArgumentParser:
    """The `cityops bench` command line."""
    parser = argparse.ArgumentParser(prog="cityops bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; under 3 minutes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--runs",
        type=int,
        help=f"runs per suite (default {MIN_RUNS}, at least {MIN_RUNS}; --quick: 1 run of each "
        "service suite and 3 end-to-end windows, to check the harness in under 3 minutes)",
    )
    parser.add_argument(
        "--only", default=",".join(SUITES), help=f"comma list of suites: {', '.join(SUITES)}"
    )
    parser.add_argument("--env-file", type=Path, default=Path(".stack/cityops.env"))
    return parser


async def run_e2e_suite(env: Mapping[str, str], *, quick: bool, runs: int) -> SuiteResult:
    """The end-to-end suite: `runs` measurement windows under one steady load."""
    base = e2e.QUICK if quick else e2e.FULL
    config = dataclasses.replace(base, windows=runs)
    title = "End to end: sensor publish -> state / ticket visible in the API"
    source = "cityops/bench/e2e.py: run_e2e_bench()"
    try:
        windows, pooled = await e2e.run_e2e_bench(env, config=config)
    except Exception as exc:  # the report says what broke instead of inventing numbers
        log.exception("e2e benchmark failed")
        return SuiteResult("e2e", title, source, status="failed", detail=f"{exc}"[:1500])
    notes = [
        f"Load: `cityops simulate` with {pooled['devices']:,} devices at "
        f"{config.rate:,.0f} msgs/s (gateway mode, QoS 1); ingest, rules and api as "
        f"subprocesses on a fresh database and fresh topics; {config.windows} windows of "
        f"{config.window_s:.0f} s after {config.warmup_s:.0f} s of warm-up.",
        f"Probes: {config.probe_bins} extra bins in district `{e2e.PROBE_DISTRICT}`, one probe "
        f"every {config.probe_interval_s:g} s alternating state and ticket (bin_fire); while a "
        "probe is pending the API is polled every "
        f"{config.poll_interval_s * 1000:g} ms (`GET /v1/devices/{{id}}` of the pending bin for "
        "state, `GET /v1/tickets?district=` for tickets, each on its own loop), so latencies "
        "are upper bounds (true value up to one poll interval + one request less).",
        "Pooled over all windows: "
        + ", ".join(
            f"{key} {value:g}" if is_number(value) else f"{key} {value}"
            for key, value in pooled.items()
        )
        + ".",
        "`stream_*` are the same probes seen on `/v1/stream` (Server-Sent Events, fed from "
        "Kafka by the API): no polling error, but before the state is written to PostgreSQL.",
        "`mqtt_puback_*` is the broker's publish -> PUBACK time for the probes: when it has "
        "seconds-long outliers, the broker itself stalled (e.g. while saving its persistence "
        "file) and every path downstream inherits them.",
        "`pipeline_msgs_per_s` counts records reaching the telemetry topic during the window; "
        "`cpu_*_pct` is CPU time of each process over the window (100 = one core).",
    ]
    return SuiteResult("e2e", title, source, runs=windows, notes=notes, targets=E2E_TARGETS)


async def run_all(args: argparse.Namespace, env: dict[str, str], argv: list[str]) -> int:
    """Run the chosen suites and write the report."""
    started = time.monotonic()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SUITES))
    if unknown:
        print(f"cityops bench: unknown suites {unknown}", file=sys.stderr)
        return 2
    machine = machine_facts()
    found_versions = await versions(
        database_url=env.get("CITYOPS_DATABASE_URL"), stack_dir=Path(".stack"), repo=Path.cwd()
    )
    service_runs = args.runs or (1 if args.quick else MIN_RUNS)
    suites: list[SuiteResult] = [
        await run_service_suite(suite, env, quick=args.quick, runs=service_runs)
        for suite in SERVICE_SUITES
        if suite.service in chosen
    ]
    if "e2e" in chosen:
        suites.append(await run_e2e_suite(env, quick=args.quick, runs=args.runs or MIN_RUNS))
    report = BenchReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        command="cityops bench " + shlex.join(argv),
        mode="quick (harness check; small sizes)" if args.quick else "full",
        machine=machine,
        versions=found_versions,
        suites=suites,
        duration_s=time.monotonic() - started,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report), encoding="utf-8")
    failed = [s.name for s in suites if s.status == "failed"]
    log.info("benchmarks written to %s", args.out, extra={"failed": failed})
    print(
        f"wrote {args.out} in {report.duration_s:.0f} s" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """Entry point of `cityops bench`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < (1 if args.quick else MIN_RUNS):
        parser.error(f"--runs must be at least {MIN_RUNS} (medians of at least three runs)")
    env = load_env(args.env_file, os.environ)
    missing = [
        key
        for key in ("CITYOPS_KAFKA_BOOTSTRAP", "CITYOPS_MQTT_URL", "CITYOPS_DATABASE_URL")
        if key not in env
    ]
    if missing:
        parser.error(f"missing settings {missing}: start the stack (`make stack-up`) first")
    logging_settings = BaseServiceSettings()
    configure_logging(
        service="bench",
        instance_id=logging_settings.instance_id,
        level=logging_settings.log_level,
        fmt=logging_settings.log_format,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe poll otherwise
    return asyncio.run(run_all(args, env, argv))
