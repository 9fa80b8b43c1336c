"""Keep a server running: restart it when it dies on its own, like systemd's Restart=on-failure.

`python -m cityops.stack.supervise --name N --pid-file F -- ARGV...` runs ARGV, writes the
child's pid to F (tools signal the server itself, e.g. SIGHUP to reload Mosquitto), and:

- on SIGTERM / SIGINT forwards the signal, waits for the child and exits 0;
- when the child exits 0 on its own, exits 0;
- when it crashes, logs why and starts it again after a short pause, up to a bound of
  restarts per minute (then exits 1: a server that cannot stay up needs a person).

The native stack runs Mosquitto under it: Debian 12's Mosquitto 2.0.11 was seen to segfault
during SIGHUP reloads (upstream eclipse-mosquitto/mosquitto#3418, session expiry list
corruption, fixed in later releases), and production units restart it the same way.
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
    """Run `argv` until told to stop; restart it after crashes (bounded)."""
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
            if stopping or returncode == 0:
                return 0
            now = time.monotonic()
            crashes.append(now)
            while crashes and now - crashes[0] > RESTART_WINDOW_S:
                crashes.popleft()
            if len(crashes) > MAX_RESTARTS:
                _say(name, f"died {len(crashes)} times within {RESTART_WINDOW_S:.0f}s; giving up")
                return 1
            _say(name, f"died ({describe_exit(returncode)}); restarting in {RESTART_PAUSE_S}s")
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
