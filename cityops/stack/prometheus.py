"""Prometheus (Debian's binary) with the project's scrape config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, write_if_changed

PORT = 9090
URL = f"http://127.0.0.1:{PORT}"
BINARY = "/usr/bin/prometheus"


class PrometheusLayout:
    """Paths under `.stack/prometheus`."""

    def __init__(self, paths: StackPaths) -> None:
        self.home = paths.root / "prometheus"
        self.data = self.home / "data"
        self.config = self.home / "prometheus.yml"
        self.template = paths.deploy / "prometheus" / "prometheus.yml"


def render_config(template: Path) -> str:
    """The checked-in config with `rule_files` resolved against the template's folder."""
    config: dict[str, Any] = yaml.safe_load(template.read_text(encoding="utf-8"))
    config["rule_files"] = [
        str((template.parent / pattern).resolve()) if not Path(pattern).is_absolute() else pattern
        for pattern in config.get("rule_files") or []
    ]
    header = f"# rendered by `cityops stack up` from {template}; edit that file instead\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def prepare(paths: StackPaths) -> bool:
    """Write the rendered config; returns whether it changed."""
    if not Path(BINARY).exists():
        raise StackError(f"{BINARY} not found: the prometheus package is not installed")
    layout = PrometheusLayout(paths)
    layout.data.mkdir(parents=True, exist_ok=True)
    return write_if_changed(layout.config, render_config(layout.template))


def spec(paths: StackPaths) -> ServerSpec:
    """How to run Prometheus on loopback (lifecycle API on: POST /-/reload re-reads rules)."""
    layout = PrometheusLayout(paths)
    return ServerSpec(
        name="prometheus",
        argv=[
            BINARY,
            f"--config.file={layout.config}",
            f"--storage.tsdb.path={layout.data}",
            "--storage.tsdb.retention.time=15d",
            f"--web.listen-address=127.0.0.1:{PORT}",
            "--web.enable-lifecycle",
        ],
        marker=str(layout.config),
        ports=(PORT,),
        cwd=layout.home,
        stop_timeout_s=30.0,
    )
