"""Every query of the cityops dashboards and Prometheus rules, ready to run outside Grafana.

Shared by tests/unit/test_grafana_dashboards.py (static checks) and
tests/integration/test_dashboards_proof.py (each query against the real servers). Grafana's
template variables and SQL macros are expanded the way Grafana would for "All".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
RULES = REPO / "deploy" / "prometheus" / "rules"

# The SQL macros dashboards may use; anything else would reach PostgreSQL unexpanded.
SQL_MACROS = {"__timeFilter", "__timeFrom", "__timeTo", "__timeGroupAlias"}
_MACRO = re.compile(r"\$(__[A-Za-z]+)")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|([A-Za-z][A-Za-z0-9_]*))")
_GROUP_INTERVAL = re.compile(r"^'?(\d+)([smhd])'?$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Query:
    """One query of one panel (or rule)."""

    source: str  # dashboard uid or rule file name
    title: str  # panel title, variable name or rule name
    ref: str
    language: str  # "promql" or "sql"
    text: str
    instant: bool = True
    fmt: str = "table"


def load_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> parsed dashboard JSON."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS.glob("*.json"))
    }


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    """uid -> datasource entry, from the provisioning files."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DATASOURCES.glob("*.yml")):
        for entry in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]:
            found[entry["uid"]] = entry
    return found


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(boards: dict[str, dict[str, Any]] | None = None) -> list[Query]:
    """Every panel target and every query variable of every dashboard."""
    queries: list[Query] = []
    for board in (boards or load_dashboards()).values():
        uid = board["uid"]
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                language = "sql" if "postgres" in variable["datasource"]["type"] else "promql"
                queries.append(
                    Query(uid, f"${variable['name']}", "var", language, variable["query"])
                )
        for panel in iter_panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if "expr" in target:
                    queries.append(
                        Query(
                            uid,
                            panel["title"],
                            target["refId"],
                            "promql",
                            target["expr"],
                            instant=bool(target.get("instant")),
                        )
                    )
                elif "rawSql" in target:
                    queries.append(
                        Query(
                            uid,
                            panel["title"],
                            target["refId"],
                            "sql",
                            target["rawSql"],
                            fmt=target.get("format", "table"),
                        )
                    )
    return queries


def rule_queries() -> list[Query]:
    """Every recording and alerting expression of deploy/prometheus/rules."""
    queries = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                queries.append(Query(path.name, name, group["name"], "promql", rule["expr"]))
    return queries


def variables_used(text: str) -> set[str]:
    """Template variable names referenced as $name or ${name} (macros excluded)."""
    return {a or b for a, b in _VARIABLE.findall(text) if not (a or b).startswith("__")}


def expand_promql(expr: str) -> str:
    """PromQL as Grafana sends it with every variable on All (regex matching anything)."""
    expanded = expr.replace("${district}", ".*").replace("$district", ".*")
    return expanded.replace("${kind}", ".*").replace("$kind", ".*")


def _quoted(values: Sequence[str]) -> str:
    return ",".join("'" + value.replace("'", "''") + "'" for value in values)


def _group_alias(column: str, interval: str) -> str:
    match = _GROUP_INTERVAL.match(interval.strip())
    if match is None:
        raise ValueError(f"unsupported $__timeGroupAlias interval {interval!r}")
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    return f'to_timestamp(floor(extract(epoch from {column})/{seconds})*{seconds}) AS "time"'


def expand_sql(
    query: str,
    *,
    districts: Sequence[str],
    kinds: Sequence[str],
    time_from: datetime,
    time_to: datetime,
) -> str:
    """SQL as Grafana's PostgreSQL datasource would run it (multi-value variables quoted)."""
    unknown = set(_MACRO.findall(query)) - SQL_MACROS
    if unknown:
        raise ValueError(f"unsupported macros {sorted(unknown)}")
    start, end = f"'{time_from.isoformat()}'", f"'{time_to.isoformat()}'"
    text = re.sub(
        r"\$__timeGroupAlias\(\s*([^,()]+?)\s*,\s*([^()]+?)\s*\)",
        lambda m: _group_alias(m.group(1), m.group(2)),
        query,
    )
    text = re.sub(
        r"\$__timeFilter\(\s*([^()]+?)\s*\)",
        lambda m: f"{m.group(1)} BETWEEN {start} AND {end}",
        text,
    )
    text = text.replace("$__timeFrom()", start).replace("$__timeTo()", end)
    text = text.replace("${district}", "$district").replace("${kind}", "$kind")
    return text.replace("$district", _quoted(districts)).replace("$kind", _quoted(kinds))
