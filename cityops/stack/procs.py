"""Processes the stack starts: detached launch, pid files, identity checks, stop, port owners."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cityops.stack.layout import StackError, StackPaths

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one server and recognise it later.

    `marker` is a string that appears in the server's command line and nowhere else (our config
    path): a pid file only counts when the process it names still carries the marker, so a
    recycled pid never gets signalled.
    """

    name: str
    argv: Sequence[str]
    marker: str
    ports: Sequence[int]
    user: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout_s: float = 30.0


def run_command(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    timeout_s: float = 600.0,
) -> str:
    """Run a command to completion; a failure becomes a StackError naming `what` failed."""
    try:
        completed = subprocess.run(  # noqa: S603 - argv is built by the stack, never a shell
            list(argv),
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            user=user,
            group=_primary_group(user),
            extra_groups=[] if user else None,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise StackError(f"{what} failed: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what} did not finish within {timeout_s:.0f}s") from exc
    if completed.returncode != 0:
        output = (completed.stderr.strip() or completed.stdout.strip()).splitlines()
        last = output[-1] if output else "(no output)"
        raise StackError(f"{what} failed (exit {completed.returncode}): {last}")
    return completed.stdout


def _primary_group(user: str | None) -> int | None:
    return None if user is None else pwd.getpwnam(user).pw_gid


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return True
    # the state follows the parenthesised command name, which may itself contain spaces
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def read_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file`, or None when there is no usable file."""
    try:
        return int(pid_file.read_text(encoding="utf-8").split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def running_pid(paths: StackPaths, spec: ServerSpec) -> int | None:
    """The pid of our running `spec` server, or None (a stale pid file is removed)."""
    pid_file = paths.pid_file(spec.name)
    pid = read_pid(pid_file)
    if pid is None:
        return None
    cmdline = _cmdline(pid)
    # right after exec() the kernel shows an empty cmdline for a moment: look again, bounded
    deadline = time.monotonic() + 1.0
    while cmdline == "" and time.monotonic() < deadline:
        time.sleep(0.01)
        cmdline = _cmdline(pid)
    if cmdline is None or spec.marker not in cmdline or _is_zombie(pid):
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def start(paths: StackPaths, spec: ServerSpec) -> subprocess.Popen[bytes]:
    """Start `spec` detached (own session, output to its log file) and write its pid file."""
    log_path = paths.log_file(spec.name)
    with log_path.open("ab") as log:
        log.write(f"\n=== cityops stack: starting {spec.name} at {time.ctime()} ===\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(  # noqa: S603 - argv is built by the stack, never a shell
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env={**_base_env(), **spec.env},
                user=spec.user,
                group=_primary_group(spec.user),
                extra_groups=[] if spec.user else None,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise StackError(f"cannot start {spec.name}: {exc}") from exc
    paths.pid_file(spec.name).write_text(f"{process.pid}\n", encoding="utf-8")
    return process


def _base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "JAVA_HOME", "TZ")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    env.setdefault("LANG", "C.UTF-8")
    return env


def _wait_gone(pid: int, marker: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cmdline = _cmdline(pid)
        if cmdline is None or marker not in cmdline or _is_zombie(pid):
            return True
        time.sleep(0.1)
    return False


def stop(paths: StackPaths, spec: ServerSpec) -> str:
    """Stop our `spec` server (its stop signal, then SIGKILL after a bound); says what happened."""
    pid = running_pid(paths, spec)
    pid_file = paths.pid_file(spec.name)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return "not running"
    try:
        os.kill(pid, spec.stop_signal)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return "not running"
    if _wait_gone(pid, spec.marker, spec.stop_timeout_s):
        pid_file.unlink(missing_ok=True)
        return f"stopped (pid {pid})"
    # the session leader ignored its stop signal: kill its whole process group (same session)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if not _wait_gone(pid, spec.marker, 10.0):
        raise StackError(f"{spec.name} (pid {pid}) survived SIGKILL")
    pid_file.unlink(missing_ok=True)
    return f"killed after {spec.stop_timeout_s:.0f}s (pid {pid})"


def listening_pids(port: int) -> set[int]:
    """Pids of processes with a TCP socket listening on `port` (any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="utf-8").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            listening = len(fields) > 9 and fields[3] == _LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return set()
    targets = {f"socket:[{inode}]" for inode in inodes}
    owners: set[int] = set()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            for fd in (proc_dir / "fd").iterdir():
                if str(fd.readlink()) in targets:
                    owners.add(int(proc_dir.name))
                    break
        except OSError:
            continue
    if not owners:
        owners.add(-1)  # a listener whose owner we cannot see is still a listener
    return owners


def describe_pid(pid: int) -> str:
    """`pid 123 (cmdline...)` for messages."""
    cmdline = _cmdline(pid) if pid > 0 else None
    if not cmdline:
        return "an unknown process" if pid < 0 else f"pid {pid}"
    short = cmdline if len(cmdline) <= 80 else cmdline[:77] + "..."
    return f"pid {pid} ({short})"


def owner_of(pid: int) -> str:
    """The command line of `pid`, or "" when it is gone."""
    return _cmdline(pid) or ""


def write_if_changed(path: Path, text: str, *, mode: int = 0o644) -> bool:
    """Write `text` to `path` unless it already holds it; returns whether it changed."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return True


def ensure_traversable(directory: Path) -> list[Path]:
    """Give `directory` and its ancestors o+x so dropped-privilege servers can reach `.stack`."""
    changed = []
    for path in [directory, *directory.parents]:
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)
            changed.append(path)
    return changed


def log_tail(path: Path, lines: int = 5) -> str:
    """The last `lines` lines of a log file, joined with ' | ' for a one-line message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)


@contextlib.contextmanager
def stack_lock(paths: StackPaths, *, timeout_s: float = 900.0) -> Iterator[None]:
    """Serialise `up` / `down` / `reset` across processes (several `make test` at once)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    with (paths.run / "stack.lock").open("a") as handle:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another `cityops stack` command held {handle.name} for {timeout_s:.0f}s"
                    ) from None
                if not announced:
                    print("stack: waiting for another `cityops stack` command", flush=True)
                    announced = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
