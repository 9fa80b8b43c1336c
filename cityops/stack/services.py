"""`cityops stack services up|down|status`: the cityops services and a simulated city, natively.

`make up` runs this after `stack up` and `migrate`: ingest, rules, api and the simulator start
as background processes with pid files and logs under `.stack/`, each with the settings of
`.stack/cityops.env`; `up` returns once each service answers `/readyz`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cityops.stack.credentials import parse_env_file
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.probes import probe_http_ok, wait_ready
from cityops.stack.procs import ServerSpec, log_tail, running_pid, start, stop


@dataclass(frozen=True)
class Service:
    """One cityops process of the demo."""

    name: str
    args: tuple[str, ...]
    ready_url: str | None  # None: no HTTP endpoint to wait for (the simulator)


# start order; `down` stops in reverse. The simulator starts last so its devices are seen.
SERVICES = (
    Service("ingest", ("ingest",), "http://127.0.0.1:9101/readyz"),
    Service("rules", ("rules",), "http://127.0.0.1:9102/readyz"),
    Service("api", ("api",), "http://127.0.0.1:8000/readyz"),
    Service(
        "simulator",
        ("simulate", "--devices-per-kind", "50", "--accelerate", "60", "--faults"),
        None,
    ),
)
READY_TIMEOUT_S = 60.0
TARGETS_TIMEOUT_S = 30.0  # a few of Prometheus' 5 s scrape intervals
PROMETHEUS_TARGETS_URL = "http://127.0.0.1:9090/api/v1/targets?state=active"


def prometheus_targets() -> dict[str, str]:
    """Scrape URL -> health ("up", "down", "unknown") of every active Prometheus target."""
    with urllib.request.urlopen(PROMETHEUS_TARGETS_URL, timeout=5) as response:
        body = json.load(response)
    return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}


def wait_targets_up(timeout_s: float = TARGETS_TIMEOUT_S) -> dict[str, str]:
    """Wait (bounded) until Prometheus has scraped every target successfully; return health."""
    deadline = time.monotonic() + timeout_s
    health = prometheus_targets()
    while any(state != "up" for state in health.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
        health = prometheus_targets()
    return health


def _cityops_executable() -> Path:
    return Path(sys.executable).with_name("cityops")


def service_spec(paths: StackPaths, service: Service, env: dict[str, str]) -> ServerSpec:
    """How to launch one service; the marker is the console script plus its subcommand."""
    executable = str(_cityops_executable())
    return ServerSpec(
        name=f"svc-{service.name}",
        argv=(executable, *service.args),
        marker=f"{executable} {service.args[0]}",
        ports=(),
        env={**env, "CITYOPS_LOG_FORMAT": "json"},
        cwd=paths.repo,
        stop_timeout_s=20.0,
    )


def _stack_env(paths: StackPaths) -> dict[str, str]:
    if not paths.env_file.exists():
        raise StackError(f"{paths.env_file} is missing: run `cityops stack up` first")
    return parse_env_file(paths.env_file.read_text(encoding="utf-8"))


def cmd_services_up(paths: StackPaths) -> int:
    """Start every service that is not running, wait for readiness, print where to look."""
    env = _stack_env(paths)
    specs = {svc.name: service_spec(paths, svc, env) for svc in SERVICES}
    for svc in SERVICES:
        spec = specs[svc.name]
        pid = running_pid(paths, spec)
        if pid is None:
            pid = start(paths, spec).pid
            print(f"{svc.name}: started (pid {pid}), log {paths.log_file(spec.name)}", flush=True)
        else:
            print(f"{svc.name}: already running (pid {pid})", flush=True)
        if svc.ready_url is not None:
            url = svc.ready_url

            def alive(spec: ServerSpec = spec) -> str | None:
                if running_pid(paths, spec) is None:
                    return f"exited: {log_tail(paths.log_file(spec.name))}"
                return None

            asyncio.run(
                wait_ready(
                    svc.name,
                    lambda url=url: probe_http_ok(url),  # type: ignore[misc]
                    timeout_s=READY_TIMEOUT_S,
                    alive=alive,
                )
            )
    health = wait_targets_up()
    print("\nPrometheus targets:", flush=True)
    for url, state in sorted(health.items()):
        print(f"  {state:<7} {url}", flush=True)
    print(
        "\ncityops is running:\n"
        "  API            http://127.0.0.1:8000/docs  (OpenAPI at /openapi.json)\n"
        "  Prometheus     http://127.0.0.1:9090/targets\n"
        "  metrics        http://127.0.0.1:9101/metrics (ingest), :9102 (rules), "
        ":8000/metrics (api)\n"
        f"  logs           {paths.logs}/\n"
        "\ntry (the admin key stays in the env file, not on screen):\n"
        f"  set -a; . {paths.env_file}; set +a\n"
        '  curl -s -H "Authorization: Bearer $CITYOPS_API_BOOTSTRAP_KEY" '
        "'http://127.0.0.1:8000/v1/devices?kind=wastebin&limit=5'\n"
        '  curl -s -H "Authorization: Bearer $CITYOPS_API_BOOTSTRAP_KEY" '
        "'http://127.0.0.1:8000/v1/tickets?status=open'\n"
        "\nstop everything with `make down`.",
        flush=True,
    )
    return 0 if all(state == "up" for state in health.values()) else 1


def cmd_services_down(paths: StackPaths) -> int:
    """Stop the services this command started (pid files), last started first."""
    env = _stack_env(paths) if paths.env_file.exists() else {}
    for svc in reversed(SERVICES):
        print(f"{svc.name}: {stop(paths, service_spec(paths, svc, env))}", flush=True)
    return 0


def cmd_services_status(paths: StackPaths) -> int:
    """One line per service: running (pid) or stopped."""
    env = _stack_env(paths) if paths.env_file.exists() else {}
    running = True
    for svc in SERVICES:
        pid = running_pid(paths, service_spec(paths, svc, env))
        running &= pid is not None
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{svc.name:<10} {state}")
    return 0 if running else 1
