"""`cityops stack up|down|status|env|reset`: the native infrastructure stack on loopback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cityops.stack import kafka, mosquitto, packages, postgres, prometheus, services
from cityops.stack.credentials import (
    INGEST_USER,
    StackSecrets,
    database_url,
    grafana_url,
    load_or_create_secrets,
    load_secrets,
    superuser_url,
    write_env,
)
from cityops.stack.layout import StackError, StackPaths, repo_root
from cityops.stack.probes import (
    Probe,
    probe_http_ok,
    probe_kafka,
    probe_mqtt,
    probe_postgres,
    wait_ready,
)
from cityops.stack.procs import (
    ServerSpec,
    describe_pid,
    ensure_traversable,
    listening_pids,
    log_tail,
    owner_of,
    running_pid,
    stack_lock,
    start,
    stop,
)

# start order; `down` stops in reverse
SERVERS = ("postgres", "mosquitto", "kafka", "prometheus")
READY_TIMEOUT_S = {"postgres": 60.0, "mosquitto": 30.0, "kafka": 120.0, "prometheus": 60.0}
PORT_FREE_TIMEOUT_S = 15.0


def server_specs(paths: StackPaths) -> dict[str, ServerSpec]:
    """Every server of the stack, by name."""
    return {
        "postgres": postgres.spec(paths),
        "mosquitto": mosquitto.spec(paths),
        "kafka": kafka.spec(paths),
        "prometheus": prometheus.spec(paths),
    }


def probes(stack_secrets: StackSecrets) -> dict[str, Probe]:
    """One real request per server."""
    return {
        "postgres": lambda: probe_postgres(database_url(stack_secrets)),
        "mosquitto": lambda: probe_mqtt(
            "127.0.0.1", mosquitto.PORT, INGEST_USER, stack_secrets.mqtt_ingest_password
        ),
        "kafka": lambda: probe_kafka(kafka.admin_access(stack_secrets)),
        "prometheus": lambda: probe_http_ok(f"{prometheus.URL}/-/ready"),
    }


def endpoints(paths: StackPaths) -> dict[str, str]:
    """What each server is reachable at (no secrets)."""
    return {
        "postgres": "postgresql://cityops@127.0.0.1:5432/cityops",
        "mosquitto": "mqtt://127.0.0.1:1883",
        "kafka": kafka.BOOTSTRAP,
        "prometheus": prometheus.URL,
        "env": str(paths.env_file),
    }


def _free_port(spec: ServerSpec, port: int) -> None:
    """Make `port` free for `spec`: stop Debian's own service on it, refuse anything else."""
    owners = listening_pids(port)
    if not owners:
        return
    commands = " ".join(owner_of(pid) for pid in owners)
    stopped_debian_service = False
    if spec.name == "postgres" and "/var/lib/postgresql" in commands + _debian_pg_hint():
        print("stack: stopping Debian's PostgreSQL cluster on port 5432", flush=True)
        packages.stop_debian_postgres()
        stopped_debian_service = True
    elif spec.name in packages.DEBIAN_SERVICES and _debian_service_running(spec.name):
        print(f"stack: stopping and disabling Debian's {spec.name} service", flush=True)
        packages.stop_debian_service(spec.name, disable=True)
        stopped_debian_service = True
    if stopped_debian_service:
        deadline = time.monotonic() + PORT_FREE_TIMEOUT_S
        while listening_pids(port) and time.monotonic() < deadline:
            time.sleep(0.2)
    still = listening_pids(port)
    if still:
        raise StackError(
            f"port {port} (for {spec.name}) is taken by {describe_pid(min(still))}: "
            "stop that process and run `cityops stack up` again"
        )


def _debian_pg_hint() -> str:
    # the postmaster's command line may not show its data dir; pg_lsclusters knows
    if shutil.which("pg_lsclusters") is None:
        return ""
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"],  # noqa: S607 - Debian tool
        capture_output=True,
        text=True,
        check=False,
    )
    online = [line for line in listing.stdout.splitlines() if " online" in line]
    return " /var/lib/postgresql" if any(f" {postgres.PORT} " in line for line in online) else ""


def _debian_service_running(service: str) -> bool:
    if not Path(f"/etc/init.d/{service}").exists():
        return False
    status = subprocess.run(  # noqa: S603
        ["service", service, "status"],  # noqa: S607 - Debian tool
        capture_output=True,
        check=False,
    )
    return status.returncode == 0


def _alive_check(
    paths: StackPaths, spec: ServerSpec, process: subprocess.Popen[bytes] | None
) -> Callable[[], str | None]:
    def alive() -> str | None:
        if process is not None:
            code = process.poll()
            if code is None:
                return None
        elif running_pid(paths, spec) is not None:
            return None
        else:
            code = None
        paths.pid_file(spec.name).unlink(missing_ok=True)
        tail = log_tail(paths.log_file(spec.name), lines=3)
        status = f"exit code {code}" if code is not None else "process gone"
        return f"{status}; see {paths.log_file(spec.name)}: {tail}"

    return alive


async def _logs_in(url: str) -> bool:
    return await probe_postgres(url) is None


async def _wait_postgres(
    paths: StackPaths,
    stack_secrets: StackSecrets,
    spec: ServerSpec,
    process: subprocess.Popen[bytes] | None,
) -> float:
    """Wait for the server, then make sure roles and database exist (only when a login fails)."""
    started = time.monotonic()
    logins = (database_url(stack_secrets), grafana_url(stack_secrets))
    if all(await asyncio.gather(*(_logs_in(url) for url in logins))):
        return time.monotonic() - started
    alive = _alive_check(paths, spec, process)
    await wait_ready(
        "postgres",
        lambda: probe_postgres(superuser_url(stack_secrets)),
        timeout_s=READY_TIMEOUT_S["postgres"],
        alive=alive,
    )
    await postgres.provision(stack_secrets)
    await wait_ready(
        "postgres", lambda: probe_postgres(database_url(stack_secrets)), timeout_s=10, alive=alive
    )
    return time.monotonic() - started


async def _wait_all(
    paths: StackPaths,
    stack_secrets: StackSecrets,
    specs: dict[str, ServerSpec],
    started: dict[str, subprocess.Popen[bytes]],
) -> dict[str, float]:
    checks = probes(stack_secrets)
    waits = {}
    try:
        async with asyncio.TaskGroup() as group:
            for name in SERVERS:
                process = started.get(name)
                if name == "postgres":
                    coro = _wait_postgres(paths, stack_secrets, specs[name], process)
                else:
                    coro = wait_ready(
                        name,
                        checks[name],
                        timeout_s=READY_TIMEOUT_S[name],
                        alive=_alive_check(paths, specs[name], process),
                    )
                waits[name] = group.create_task(coro)
    except ExceptionGroup as failures:
        # one line per broken server instead of a traceback; anything unexpected propagates
        expected, unexpected = failures.split(StackError)
        if expected is not None and unexpected is None:
            raise StackError("; ".join(str(exc) for exc in expected.exceptions)) from None
        raise
    return {name: task.result() for name, task in waits.items()}


def _old_broker_running(paths: StackPaths) -> bool:
    """Whether the supervised broker runs another binary than ours (e.g. Debian's 2.0.11)."""
    try:
        pid = int(paths.child_pid_file("mosquitto").read_text(encoding="utf-8").split()[0])
        return Path(f"/proc/{pid}/exe").resolve() != Path(mosquitto.BINARY).resolve()
    except (OSError, ValueError, IndexError):
        return False


def cmd_up(paths: StackPaths) -> int:
    """Install, configure and start whatever is missing; wait until every server answers."""
    begun = time.monotonic()
    if os.geteuid() != 0:
        raise StackError(
            "`cityops stack up` must run as root (it installs packages, switches users)"
        )
    packages.require_tools()
    packages.ensure_packages()
    paths.ensure()
    for directory in ensure_traversable(paths.root):
        print(f"stack: made {directory} traversable (o+x) for the server users", flush=True)
    stack_secrets = load_or_create_secrets(paths)

    changed = {
        "postgres": postgres.prepare(paths, stack_secrets),
        "kafka": kafka.prepare(paths, stack_secrets),
        "prometheus": prometheus.prepare(paths),
    }
    changed["mosquitto"] = mosquitto.prepare(paths, stack_secrets)

    specs = server_specs(paths)
    if changed["kafka"] and running_pid(paths, specs["kafka"]) is not None:
        # A running broker keeps its old listeners and ACL settings until restarted (SASL
        # came in this way): a clean stop keeps every log, and the start below recovers none.
        print("stack: kafka config changed; restarting it to apply", flush=True)
        print(f"kafka: {stop(paths, specs['kafka'])}", flush=True)
    to_start = [name for name in SERVERS if running_pid(paths, specs[name]) is None]
    if "mosquitto" not in to_start and (changed["mosquitto"] or _old_broker_running(paths)):
        # clients reconnect (their sessions are saved at a clean stop); credentials never
        # need this, the plugin follows the password files
        print("stack: restarting mosquitto (new binary, config or auth plugin)", flush=True)
        print(f"mosquitto: {stop(paths, specs['mosquitto'])}", flush=True)
        to_start.insert(SERVERS.index("mosquitto"), "mosquitto")
        to_start.sort(key=SERVERS.index)
    for name in SERVERS:
        if name in to_start:
            continue
        if changed[name]:
            print(
                f"stack: {name} config changed; restart it to apply "
                "(`cityops stack down && cityops stack up`)",
                flush=True,
            )
    # every port is checked before anything starts: a conflict leaves nothing half-started
    for name in to_start:
        for port in specs[name].ports:
            _free_port(specs[name], port)
    started = {name: start(paths, specs[name]) for name in to_start}

    waited = asyncio.run(_wait_all(paths, stack_secrets, specs, started))
    created = asyncio.run(kafka.ensure_access(stack_secrets))
    if created:
        print(f"stack: created Kafka topics {', '.join(created)}", flush=True)
    write_env(paths, stack_secrets)

    width = max(len(name) for name in endpoints(paths))
    for name, where in endpoints(paths).items():
        if name in specs:
            pid = running_pid(paths, specs[name])
            how = "started" if name in started else "running"
            note = f"{how}, pid {pid}, answered after {waited[name]:.1f}s"
            print(f"{name:<{width}}  {where}  ({note})")
        else:
            print(f"{name:<{width}}  {where}")
    print(f"stack: up in {time.monotonic() - begun:.1f}s")
    return 0


def cmd_down(paths: StackPaths) -> int:
    """Stop the servers this stack started (pid files), last started first."""
    specs = server_specs(paths)
    for name in reversed(SERVERS):
        print(f"{name}: {stop(paths, specs[name])}", flush=True)
    return 0


def cmd_status(paths: StackPaths) -> int:
    """One line per server: running (pid) or stopped, and whether it answers a real request."""
    specs = server_specs(paths)
    stack_secrets = load_secrets(paths)

    async def answers() -> dict[str, str | None]:
        if stack_secrets is None:
            return dict.fromkeys(SERVERS, "no complete .stack/secrets.env: run `stack up`")
        checks = probes(stack_secrets)
        results = await asyncio.gather(*(checks[name]() for name in SERVERS))
        return dict(zip(SERVERS, results, strict=True))

    results = asyncio.run(answers())
    healthy = True
    width = max(len(name) for name in SERVERS)
    for name in SERVERS:
        pid = running_pid(paths, specs[name])
        state = f"running (pid {pid})" if pid is not None else "stopped"
        reason = results[name]
        answer = "answers" if reason is None else f"does not answer ({reason})"
        healthy &= pid is not None and reason is None
        print(f"{name:<{width}}  {state}, {answer}")
    return 0 if healthy else 1


def cmd_env(paths: StackPaths) -> int:
    """Print the path of `.stack/cityops.env`."""
    if not paths.env_file.exists():
        raise StackError(f"{paths.env_file} does not exist yet: run `cityops stack up`")
    print(paths.env_file)
    return 0


def cmd_reset(paths: StackPaths) -> int:
    """Stop everything and delete `.stack` (all data, secrets, logs)."""
    cmd_down(paths)
    # keep run/stack.lock: we hold it, and a waiting `up` must not get a fresh, unlocked file
    for entry in paths.root.iterdir():
        if entry != paths.run:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    print(f"deleted {paths.root}")
    return 0


def _dispatch(
    command: str, paths: StackPaths, *, confirmed: bool, action: str | None = None
) -> int:
    if command == "services":
        return {
            "up": services.cmd_services_up,
            "down": services.cmd_services_down,
            "status": services.cmd_services_status,
        }[action or "status"](paths)
    if command == "status":
        return cmd_status(paths)
    if command == "env":
        return cmd_env(paths)
    if command == "reset" and not confirmed:
        raise StackError(f"reset deletes {paths.root} with all data: pass --yes to confirm")
    with stack_lock(paths):
        if command == "up":
            return cmd_up(paths)
        if command == "down":
            return cmd_down(paths)
        return cmd_reset(paths)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityops stack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "up",
        help="install, configure and start Kafka, Mosquitto, PostgreSQL, "
        "Prometheus; wait until each answers",
    )
    commands.add_parser("down", help="stop the servers the stack started")
    commands.add_parser("status", help="one line per server: running and answering?")
    commands.add_parser("env", help="print the path of the CITYOPS_* env file")
    svc = commands.add_parser(
        "services", help="start/stop ingest, rules, api and a simulated city (make up)"
    )
    svc.add_argument("action", choices=("up", "down", "status"))
    reset = commands.add_parser("reset", help="down, then delete .stack (all data)")
    reset.add_argument("--yes", action="store_true", help="confirm deleting all stack data")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `cityops stack`."""
    args = _parser().parse_args(argv)
    # aiokafka logs every refused connection while the broker boots; the probes report instead
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    logging.getLogger("aiokafka").propagate = False
    paths = StackPaths(repo=repo_root())
    try:
        return _dispatch(
            args.command,
            paths,
            confirmed=getattr(args, "yes", False),
            action=getattr(args, "action", None),
        )
    except StackError as exc:
        print(f"cityops stack {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cityops stack {args.command}: interrupted", file=sys.stderr)
        return 130
