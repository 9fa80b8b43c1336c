"""Keep a server running: restart it whenever it exits, like systemd's Restart=always.

`python -m cityops.stack.supervise --name N --pid-file F -- ARGV...` runs ARGV, writes the
child's pid to F (the server itself, for tools and fault tests), and:

- on SIGTERM / SIGINT forwards the signal, waits for the child and exits 0: only the stack
  stopping it (`cityops stack down`, or `up` replacing it) ends the server;
- whenever the child exits on its own, crash or exit 0 (a broker told to stop by someone
  else, an exit after a fatal config error), logs why and starts it again after a short
  pause, up to a bound of restarts per minute (then exits 1: a server that cannot stay up
  needs a person).

The native stack runs Mosquitto under it; production units (deploy/systemd/) do the same with
Restart=always.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType

RESTART_PAUSE_S = 1.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def _say(name: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp}: supervise {name}: {message}", file=sys.stderr, flush=True)


def describe_exit(returncode: int) -> str:
    """`exit 3` or `signal SIGSEGV` for a child's return code."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def supervise(name: str, argv: list[str], pid_file: Path) -> int:
    """Run `argv` until told to stop; restart it whenever it exits (bounded)."""
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    crashes: deque[float] = deque()
    try:
        while not stopping:
            child = subprocess.Popen(argv)  # noqa: S603 - argv comes from the stack's own spec
            pid_file.write_text(f"{child.pid}\n", encoding="utf-8")
            returncode = child.wait()
            if stopping:
                return 0
            now = time.monotonic()
            crashes.append(now)
            while crashes and now - crashes[0] > RESTART_WINDOW_S:
                crashes.popleft()
            if len(crashes) > MAX_RESTARTS:
                _say(name, f"exited {len(crashes)} times in {RESTART_WINDOW_S:.0f}s; giving up")
                return 1
            _say(name, f"exited ({describe_exit(returncode)}); restarting in {RESTART_PAUSE_S}s")
            time.sleep(RESTART_PAUSE_S)
        return 0
    finally:
        pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m cityops.stack.supervise")
    parser.add_argument("--name", required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise")
    return supervise(args.name, command, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
