"""The supervisor restarts a server on any exit, forwards SIGTERM, and gives up on a loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cityops.stack import supervise


def _start(tmp_path: Path, script: str) -> tuple[subprocess.Popen[bytes], Path]:
    pid_file = tmp_path / "child.pid"
    argv = [
        sys.executable,
        "-m",
        "cityops.stack.supervise",
        "--name",
        "demo",
        "--pid-file",
        str(pid_file),
        "--",
        "sh",
        "-c",
        script,
    ]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, cwd=tmp_path)
    return process, pid_file


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_crashed_child_is_restarted_and_sigterm_stops_it(tmp_path: Path) -> None:
    # first run: crash with SIGSEGV; later runs: mark the restart, then wait to be stopped
    script = (
        "if [ -e crashed ]; then touch restarted; exec sleep 60; "
        "else touch crashed; kill -SEGV $$; fi"
    )
    process, pid_file = _start(tmp_path, script)
    _wait((tmp_path / "restarted").exists)
    _wait(pid_file.exists)
    child = int(pid_file.read_text())
    os.kill(child, 0)  # the restarted child is alive and named by the pid file
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "exited (signal SIGSEGV); restarting" in stderr
    assert not pid_file.exists()
    _wait(lambda: not Path(f"/proc/{child}").exists() or _zombie(child))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_clean_exit_is_restarted_too(tmp_path: Path) -> None:
    # a broker stopped by someone else (SIGTERM to the server itself) exits 0: still restarted
    script = "if [ -e exited ]; then touch restarted; exec sleep 60; else touch exited; exit 0; fi"
    process, pid_file = _start(tmp_path, script)
    _wait((tmp_path / "restarted").exists)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "exited (exit 0); restarting" in stderr
    assert not pid_file.exists()


def test_a_crash_loop_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "RESTART_PAUSE_S", 0.0)
    code = supervise.supervise("demo", ["sh", "-c", "exit 3"], tmp_path / "child.pid")
    assert code == 1


def test_exit_descriptions() -> None:
    assert supervise.describe_exit(3) == "exit 3"
    assert supervise.describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
