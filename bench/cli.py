"""`python -m bench [--quick] [--out docs/benchmarks.md]`: run every benchmark, write the report.

Run from the checkout (the benchmarks are not part of the installed package); the stack must
be up (`make bench` starts it). Settings come from `.stack/cityops.env`, with
`CITYOPS_*` environment variables taking precedence.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import machine_facts, versions
from bench.registry import BY_NAME, SUITES, OptionError, parse_overrides, run_suite
from bench.report import BenchReport, render
from cityops.common.logs import configure_logging
from cityops.common.settings import BaseServiceSettings
from cityops.stack.credentials import parse_env_file

log = logging.getLogger("bench")

MIN_RUNS = 3


def load_env(env_file: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The stack's settings file overlaid with `CITYOPS_*` variables from the environment."""
    values = parse_env_file(env_file.read_text(encoding="utf-8")) if env_file.exists() else {}
    values.update({k: v for k, v in environ.items() if k.startswith("CITYOPS_")})
    return values


def build_parser() -> argparse.ArgumentParser:
    """The `python -m bench` command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; under 3 minutes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--runs",
        type=int,
        help=f"runs per suite (default {MIN_RUNS}, at least {MIN_RUNS}; --quick: 1 run of each "
        "service suite and 3 end-to-end windows, to check the harness in under 3 minutes)",
    )
    parser.add_argument(
        "--only", default=",".join(BY_NAME), help=f"comma list of suites: {', '.join(BY_NAME)}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SUITE.OPTION=VALUE",
        help="change one declared option of one suite (repeatable), e.g. ingest.count=50000",
    )
    parser.add_argument("--env-file", type=Path, default=Path(".stack/cityops.env"))
    return parser


async def run_all(
    args: argparse.Namespace,
    env: dict[str, str],
    argv: list[str],
    *,
    chosen: list[str],
    overrides: Mapping[str, Mapping[str, object]],
) -> int:
    """Run the chosen suites, in registration order, and write the report."""
    started = time.monotonic()
    machine = machine_facts()
    found_versions = await versions(
        database_url=env.get("CITYOPS_DATABASE_URL"), stack_dir=Path(".stack"), repo=Path.cwd()
    )
    suites = []
    for suite in SUITES:
        if suite.name not in chosen:
            continue
        # Repeated suites: one run each in --quick; the end-to-end suite: 3 windows always.
        runs = args.runs or (1 if args.quick and suite.repeated else MIN_RUNS)
        suites.append(
            await run_suite(
                suite, env, quick=args.quick, runs=runs, overrides=overrides.get(suite.name)
            )
        )
    report = BenchReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        command="python -m bench " + shlex.join(argv),
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
    """Entry point of `python -m bench` (`make bench`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < (1 if args.quick else MIN_RUNS):
        parser.error(f"--runs must be at least {MIN_RUNS} (medians of at least three runs)")
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown suites {unknown} (suites: {', '.join(BY_NAME)})")
    try:
        overrides = parse_overrides(args.overrides, BY_NAME)
    except OptionError as exc:
        parser.error(str(exc))
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
    return asyncio.run(run_all(args, env, argv, chosen=chosen, overrides=overrides))
