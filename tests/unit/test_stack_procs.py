"""Stack process handling without servers: pid files never get a foreign process killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityops.stack import main as stack_main
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, listening_pids, running_pid, start, stop


@pytest.fixture
def paths(tmp_path: Path) -> StackPaths:
    stack_paths = StackPaths(repo=tmp_path)
    stack_paths.ensure()
    return stack_paths


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_down_never_signals_a_process_it_did_not_start(
    paths: StackPaths, sleeper: subprocess.Popen[bytes]
) -> None:
    # a stale pid file whose pid now belongs to someone else
    for name in stack_main.SERVERS:
        paths.pid_file(name).write_text(f"{sleeper.pid}\n")
    assert stack_main.cmd_down(paths) == 0
    assert sleeper.poll() is None
    assert not any(paths.run.glob("*.pid"))


def test_start_then_stop_own_process(paths: StackPaths, tmp_path: Path) -> None:
    marker = str(tmp_path / "marker-arg")
    spec = ServerSpec(
        name="dummy",
        argv=[sys.executable, "-c", "import time, sys; time.sleep(60)", marker],
        marker=marker,
        ports=(),
        stop_timeout_s=5,
    )
    process = start(paths, spec)
    try:
        assert running_pid(paths, spec) == process.pid
        assert stop(paths, spec) == f"stopped (pid {process.pid})"
        assert process.wait(timeout=5) != 0
        assert running_pid(paths, spec) is None
        assert not paths.pid_file("dummy").exists()
        assert "starting dummy" in paths.log_file("dummy").read_text()
    finally:
        process.kill()
        process.wait()


def test_stop_escalates_to_sigkill(paths: StackPaths, tmp_path: Path) -> None:
    marker = str(tmp_path / "stubborn")
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring SIGTERM', flush=True); time.sleep(60)"
    )
    spec = ServerSpec(
        name="stubborn",
        argv=[sys.executable, "-c", code, marker],
        marker=marker,
        ports=(),
        stop_timeout_s=0.5,
    )
    process = start(paths, spec)
    try:
        deadline = time.monotonic() + 10
        while "ignoring SIGTERM" not in paths.log_file("stubborn").read_text():
            assert time.monotonic() < deadline, "child never installed its handler"
            time.sleep(0.02)
        assert stop(paths, spec).startswith("killed after")
        assert process.wait(timeout=5) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()


def test_listening_pids_finds_the_owner() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert listening_pids(port) == {os.getpid()}
    assert listening_pids(port) == set()


def test_reset_needs_confirmation_and_keeps_the_lock(paths: StackPaths) -> None:
    (paths.root / "kafka" / "data").mkdir(parents=True)
    paths.secrets_file.write_text("X=1\n")
    with pytest.raises(StackError, match="--yes"):
        stack_main._dispatch("reset", paths, confirmed=False)
    assert paths.secrets_file.exists()
    assert stack_main._dispatch("reset", paths, confirmed=True) == 0
    assert list(paths.root.iterdir()) == [paths.run]


def test_a_worktree_sharing_the_stack_by_symlink_sees_its_servers_running(tmp_path: Path) -> None:
    # /work/wt/<name>/.stack -> /work/main/.stack: a status check from the worktree must not
    # take main's running servers for stale pid files (and delete them).
    main_repo, worktree = tmp_path / "main", tmp_path / "wt"
    main_paths = StackPaths(repo=main_repo)
    main_paths.ensure()
    worktree.mkdir()
    (worktree / ".stack").symlink_to(main_repo / ".stack")
    conf = main_paths.root / "server.conf"
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(conf)])
    try:
        main_paths.pid_file("kafka").write_text(f"{server.pid}\n")
        marker = str(StackPaths(repo=worktree).root / "server.conf")
        spec = ServerSpec(name="kafka", argv=[], marker=marker, ports=(), cwd=tmp_path)
        assert running_pid(StackPaths(repo=worktree), spec) == server.pid
        assert main_paths.pid_file("kafka").exists()
    finally:
        server.kill()
        server.wait()
