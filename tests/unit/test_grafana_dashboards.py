"""Static checks of the Grafana provisioning: what Grafana would reject fails here first."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.dashboard_queries import (
    GRAFANA,
    REPO,
    dashboard_queries,
    expand_promql,
    iter_panels,
    load_dashboards,
    provisioned_datasources,
    rule_queries,
    variables_used,
)

BOARDS = load_dashboards()
UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
SQL_RELATION = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_][A-Za-z0-9_.]*)", re.IGNORECASE)
METRIC = re.compile(r"\bcityops(?:_[a-z0-9]+)+\b|\bcityops:[a-z0-9_]+:[a-z0-9_]+\b")
DEFINED_METRIC = re.compile(r"[\"'](cityops_[a-z0-9_]+)[\"']")


def build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", GRAFANA / "build_dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def known_metrics() -> set[str]:
    """Names the services export (from their source) plus the recording rules' names."""
    names = {"up"}
    for path in (REPO / "cityops").rglob("*.py"):
        for name in DEFINED_METRIC.findall(path.read_text(encoding="utf-8")):
            names |= {name, f"{name}_total"}
    names |= {query.title for query in rule_queries() if ":" in query.title}
    return names


def test_every_dashboard_file_is_present() -> None:
    assert set(BOARDS) == {
        "city-operations.json",
        "pipeline-health.json",
        "kind-streetlight.json",
        "kind-manhole.json",
        "kind-wastebin.json",
        "kind-parking.json",
    }


def test_checked_in_json_matches_the_generator() -> None:
    module = build_module()
    for name, board in module.all_dashboards().items():
        path = GRAFANA / "dashboards" / name
        assert path.read_text(encoding="utf-8") == module.render(board), (
            f"{name} is stale: run python deploy/grafana/build_dashboards.py"
        )


def test_uids_and_titles_are_valid_and_unique() -> None:
    uids = [board.get("uid") for board in BOARDS.values()]
    titles = [board.get("title") for board in BOARDS.values()]
    assert all(isinstance(uid, str) and UID.match(uid) for uid in uids), uids
    assert len(set(uids)) == len(uids)
    assert all(titles) and len(set(titles)) == len(titles)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panel_ids_are_unique_and_the_grid_has_no_overlap(name: str) -> None:
    panels = list(iter_panels(BOARDS[name]["panels"]))
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(set(ids)) == len(ids), f"duplicate panel ids in {name}"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_datasource_is_provisioned_and_matches_its_query_language(name: str) -> None:
    datasources = provisioned_datasources()
    board = BOARDS[name]
    refs: list[dict[str, Any]] = [
        variable["datasource"]
        for variable in board["templating"]["list"]
        if variable.get("type") == "query"
    ]
    for panel in iter_panels(board["panels"]):
        refs.append(panel["datasource"])
        for target in panel["targets"]:
            refs.append(target["datasource"])
            expected = "prometheus" if "expr" in target else "grafana-postgresql-datasource"
            assert target["datasource"]["type"] == expected, panel["title"]
        assert panel["targets"], f"panel {panel['title']} has no query"
    for ref in refs:
        assert ref["uid"] in datasources, f"unknown datasource uid {ref['uid']}"
        assert datasources[ref["uid"]]["type"] == ref["type"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_template_variables_are_defined_and_used(name: str) -> None:
    board = BOARDS[name]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert {"district", "kind"} <= set(variables)
    for variable in variables.values():
        assert variable["type"] in {"query", "custom", "constant"}
        if variable["type"] == "custom":
            assert set(variable["query"].split(",")) <= {
                "streetlight",
                "manhole",
                "wastebin",
                "parking",
            }
    used: set[str] = set()
    for query in dashboard_queries({name: board}):
        referenced = variables_used(query.text)
        assert referenced <= set(variables), f"{query.title}: undefined {referenced}"
        used |= referenced
    assert used, f"{name} uses none of its variables"
    if name != "pipeline-health.json":  # platform metrics carry no district
        assert "district" in used


def test_provisioning_files_are_what_grafana_expects() -> None:
    datasources = provisioned_datasources()
    assert datasources["cityops-prometheus"]["type"] == "prometheus"
    postgres = datasources["cityops-postgres"]
    assert postgres["user"] == "cityops_grafana"
    # a secret comes from the environment, never from the file
    assert postgres["secureJsonData"]["password"].startswith("$")
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "cityops.yml").read_text(encoding="utf-8")
    )
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_sql_reads_only_the_ops_views_and_is_read_only() -> None:
    for query in dashboard_queries():
        if query.language != "sql":
            continue
        relations = set(SQL_RELATION.findall(query.text))
        assert relations, query.title
        assert all(relation.startswith("ops.") for relation in relations), (query.title, relations)
        assert not re.search(r"\b(INSERT|UPDATE|DELETE|DROP|ALTER|CREATE|GRANT)\b", query.text)


def test_promql_uses_only_metrics_that_exist() -> None:
    known = known_metrics()
    for query in dashboard_queries() + rule_queries():
        if query.language != "promql":
            continue
        for name in METRIC.findall(query.text):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in known or base in known, f"{query.source} / {query.title}: {name}"


def test_no_device_id_reaches_prometheus() -> None:
    for query in dashboard_queries() + rule_queries():
        if query.language == "promql":
            assert "device_id" not in query.text


def test_every_promql_expression_parses() -> None:
    """promtool parses each dashboard expression (as a recording rule) without a server."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run `make stack-up` (installs Debian's prometheus)")
    queries = [query for query in dashboard_queries() if query.language == "promql"]
    rules = [
        {"record": f"dashboard:check:q{index}", "expr": expand_promql(query.text)}
        for index, query in enumerate(queries)
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dashboards.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
        completed = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"SUCCESS: {len(rules)} rules found" in completed.stdout
