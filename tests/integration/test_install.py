"""A normal (not editable) `pip install .` works away from the checkout.

Nothing at run time may depend on where the package is installed: the default rules are
package data, and the benchmarks stay out of the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".stack", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with cityops installed from a copy of the checkout; returns its bin/."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_SKIP)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "."],
        cwd=source,
        check=True,
        timeout=600,
    )
    shutil.rmtree(source)  # the installed package must not need its source tree
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    return subprocess.run(
        [str(bin_dir / "cityops"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rules_check_uses_the_rules_shipped_in_the_package(installed: Path) -> None:
    result = _run(installed, "rules", "--check", cwd=installed.parent)
    assert result.returncode == 0, result.stderr
    assert "site-packages/cityops/rules/default.yaml" in result.stdout
    assert "rules OK" in result.stdout


def test_kinds_check_uses_the_kinds_shipped_in_the_package(installed: Path) -> None:
    result = _run(installed, "kinds", "--check", cwd=installed.parent)
    assert result.returncode == 0, result.stderr
    assert "site-packages/cityops/kinds/shipped: 4 kinds OK" in result.stdout


def test_ingest_help_runs_from_the_installed_package(installed: Path) -> None:
    result = _run(installed, "ingest", "--help", cwd=installed.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cityops ingest")


def test_the_benchmarks_are_not_shipped(installed: Path) -> None:
    python = installed / "python"
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('bench'))"],
        cwd=installed.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "None"
    packages = list((installed.parent / "lib").glob("python3*/site-packages/cityops"))
    assert packages, "cityops is not in the venv's site-packages"
    assert not list(packages[0].rglob("bench*.py"))
