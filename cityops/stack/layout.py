"""Where the native stack keeps its files, and the error every stack step raises."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class StackError(Exception):
    """A problem the user must fix; `cityops stack` prints it as one line and exits 1."""


CHECKOUT_ENV = "CITYOPS_CHECKOUT"


def _is_checkout(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "deploy").is_dir()


def repo_root() -> Path:
    """The checkout the stack runs from (it holds `deploy/` and `.stack/`).

    `CITYOPS_CHECKOUT` when set, else the nearest directory at or above the working directory
    that holds `pyproject.toml` and `deploy/`; never derived from where the package is installed.
    """
    explicit = os.environ.get(CHECKOUT_ENV)
    if explicit:
        root = Path(explicit).resolve()
        if not _is_checkout(root):
            raise StackError(f"{CHECKOUT_ENV}={explicit} is not a cityops checkout (no deploy/)")
        return root
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if _is_checkout(candidate):
            return candidate
    raise StackError(
        f"no cityops checkout at or above {here}: run from the checkout or set {CHECKOUT_ENV}"
    )


@dataclass(frozen=True)
class StackPaths:
    """Every path the stack reads or writes; all data lives under `<repo>/.stack`."""

    repo: Path

    @property
    def root(self) -> Path:
        """`.stack/`: all data, git-ignored; resolved, so a checkout whose `.stack` is a symlink
        (a git worktree sharing main's stack) names the same files as the servers' command
        lines, and its `stack status` never takes the running servers for stale pid files."""
        return (self.repo / ".stack").resolve()

    @property
    def deploy(self) -> Path:
        """Checked-in templates and configuration."""
        return self.repo / "deploy"

    @property
    def run(self) -> Path:
        """Pid files."""
        return self.root / "run"

    @property
    def logs(self) -> Path:
        """stdout/stderr of every server."""
        return self.root / "logs"

    @property
    def secrets_file(self) -> Path:
        """Generated passwords, mode 0600."""
        return self.root / "secrets.env"

    @property
    def env_file(self) -> Path:
        """`CITYOPS_*` settings for services and tests, sourceable by bash, mode 0600."""
        return self.root / "cityops.env"

    def pid_file(self, name: str) -> Path:
        """The pid file of server `name`."""
        return self.run / f"{name}.pid"

    def child_pid_file(self, name: str) -> Path:
        """The pid of the server itself when `name` runs under a supervisor."""
        return self.run / f"{name}-child.pid"

    def log_file(self, name: str) -> Path:
        """The stdout/stderr log of server `name`."""
        return self.logs / f"{name}.log"

    def ensure(self) -> None:
        """Create `.stack/`, `run/` and `logs/` (world-traversable: servers drop privileges)."""
        for directory in (self.root, self.run, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
