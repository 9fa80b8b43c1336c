"""Generate the cityops Grafana dashboards (deploy/grafana/dashboards/*.json).

Dashboards as code: panels are declared here once, laid out automatically, and written as the
JSON Grafana provisions. `python deploy/grafana/build_dashboards.py` rewrites the files;
tests/unit/test_grafana_dashboards.py fails when the JSON and this file disagree.

PromQL panels filter with `district=~"$district"`, SQL panels with `district IN ($district)`;
SQL panels read only the `ops` views (role cityops_grafana) and use only the macros
`$__timeFilter(col)`, `$__timeFrom()`, `$__timeTo()` and `$__timeGroupAlias(col, 'N{s,m,h}')`.
"""

# ruff: noqa: S608 - SQL here is Grafana panel text built from constants, never executed by Python

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMETHEUS = {"type": "prometheus", "uid": "cityops-prometheus"}
POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "cityops-postgres"}
KINDS = ("streetlight", "manhole", "wastebin", "parking")
OUT = Path(__file__).resolve().parent / "dashboards"

D = 'district=~"$district"'
K = 'kind=~"$kind"'
SQL_D = "district IN ($district)"
SQL_K = "kind IN ($kind)"


@dataclass
class Panel:
    """One panel: its type, title, size and queries (PromQL or SQL)."""

    kind: str
    title: str
    width: int
    height: int
    targets: list[dict[str, Any]]
    description: str = ""
    unit: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    field_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def prom(expr: str, legend: str = "", *, instant: bool = False, ref: str = "A") -> dict[str, Any]:
    """A Prometheus target."""
    return {
        "refId": ref,
        "datasource": PROMETHEUS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "editorMode": "code",
    }


def sql(query: str, *, fmt: str = "table", ref: str = "A") -> dict[str, Any]:
    """A PostgreSQL target (raw SQL)."""
    return {
        "refId": ref,
        "datasource": POSTGRES,
        "rawSql": " ".join(query.split()),
        "format": fmt,
        "rawQuery": True,
        "editorMode": "code",
    }


def stat(title: str, *targets: dict[str, Any], unit: str | None = None, **kw: Any) -> Panel:
    """A single big number (last value)."""
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "auto",
    }
    return Panel("stat", title, 4, 4, list(targets), unit=unit, options=options, **kw)


def timeseries(
    title: str, *targets: dict[str, Any], unit: str | None = None, width: int = 12, **kw: Any
) -> Panel:
    """Lines over time."""
    options = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return Panel("timeseries", title, width, 8, list(targets), unit=unit, options=options, **kw)


def bars(title: str, *targets: dict[str, Any], width: int = 8, **kw: Any) -> Panel:
    """Horizontal bars, one per series (instant)."""
    options = {
        "orientation": "horizontal",
        "displayMode": "gradient",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showUnfilled": True,
    }
    return Panel("bargauge", title, width, 8, list(targets), options=options, **kw)


def table(
    title: str, *targets: dict[str, Any], width: int = 12, height: int = 8, **kw: Any
) -> Panel:
    """A table of rows."""
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    return Panel("table", title, width, height, list(targets), options=options, **kw)


def district_variable() -> dict[str, Any]:
    """`$district`: every district of the registry, multi-select, All by default."""
    query = "SELECT district FROM ops.districts ORDER BY 1"
    return {
        "name": "district",
        "label": "District",
        "type": "query",
        "datasource": POSTGRES,
        "definition": query,
        "query": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "options": [],
        "hide": 0,
    }


def kind_variable(kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """`$kind`: the device kinds (A2); one fixed kind on a per-kind dashboard."""
    options = [
        {"selected": index == 0 and len(kinds) == 1, "text": kind, "value": kind}
        for index, kind in enumerate(kinds)
    ]
    variable: dict[str, Any] = {
        "name": "kind",
        "label": "Kind",
        "type": "custom",
        "query": ",".join(kinds),
        "options": options,
        "multi": len(kinds) > 1,
        "includeAll": len(kinds) > 1,
        "hide": 0 if len(kinds) > 1 else 2,
    }
    if len(kinds) > 1:
        variable["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        variable["current"] = {"selected": True, "text": kinds[0], "value": kinds[0]}
    return variable


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    datasource = panel.targets[0]["datasource"]
    defaults: dict[str, Any] = dict(panel.field_config)
    if panel.unit:
        defaults["unit"] = panel.unit
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": datasource,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "targets": panel.targets,
        "options": panel.options,
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }
    if panel.description:
        out["description"] = panel.description
    out.update(panel.extra)
    return out


def dashboard(
    uid: str, title: str, panels: list[Panel], *, kinds: tuple[str, ...] = KINDS, time_from: str
) -> dict[str, Any]:
    """A whole dashboard: panels packed left to right on Grafana's 24-column grid."""
    laid_out = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(_panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": uid,
        "title": title,
        "tags": ["cityops"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [district_variable(), kind_variable(kinds)]},
        "panels": laid_out,
    }


# -- City operations ---------------------------------------------------------------------------

MAP_STATES = {
    0: ("ok", "green"),
    1: ("never seen", "blue"),
    2: ("open ticket", "yellow"),
    3: ("offline", "orange"),
    4: ("urgent ticket", "red"),
}


def geomap() -> Panel:
    """Every located device, coloured by ops.device_map.state_code."""
    layer = {
        "type": "markers",
        "name": "Devices",
        "tooltip": True,
        "location": {"mode": "coords", "latitude": "latitude", "longitude": "longitude"},
        "config": {
            "showLegend": True,
            "style": {
                "color": {"field": "state_code", "fixed": "green"},
                "size": {"fixed": 5},
                "opacity": 0.8,
                "symbol": {"mode": "fixed", "fixed": "img/icons/marker/circle.svg"},
            },
        },
    }
    steps = [
        {"color": color, "value": None if code == 0 else code}
        for code, (_, color) in MAP_STATES.items()
    ]
    mappings = [
        {
            "type": "value",
            "options": {
                str(code): {"text": text, "color": color, "index": code}
                for code, (text, color) in MAP_STATES.items()
            },
        }
    ]
    return Panel(
        "geomap",
        "Devices by state",
        24,
        14,
        [
            sql(f"""
            SELECT device_id, kind, district, lat AS latitude, lon AS longitude,
                   state, state_code, open_tickets, top_priority, last_seen_at
            FROM ops.device_map
            WHERE {SQL_D} AND {SQL_K}
            ORDER BY state_code
            LIMIT 50000""")
        ],
        description="Every located device. Red: open P1 ticket; orange: offline; yellow: open "
        "ticket; blue: never heard from; green: fine. From PostgreSQL (ops.device_map).",
        options={
            "view": {"id": "fit", "lat": 0, "lon": 0, "zoom": 13, "allLayers": True},
            "controls": {"showZoom": True, "mouseWheelZoom": True, "showScale": True},
            "basemap": {"type": "default", "name": "Basemap", "config": {}},
            "layers": [layer],
            "tooltip": {"mode": "details"},
        },
        field_config={
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": steps},
            "mappings": mappings,
        },
    )


def city_operations() -> dict[str, Any]:
    """The city manager's view."""
    online = (
        f'sum(cityops_city_devices{{{D},{K},connectivity="online"}})'
        f" / sum(cityops_city_devices{{{D},{K}}})"
    )
    panels = [
        stat(
            "Devices online",
            prom(online, instant=True),
            unit="percentunit",
            description="Enabled devices heard within 3x their reporting interval.",
        ),
        stat(
            "Lamps out",
            prom(f"sum(cityops_city_lamps_out{{{D}}})", instant=True),
            description="Street lights reporting a fault or holding a lamp ticket.",
        ),
        stat("Bins ≥ 90 % full", prom(f"sum(cityops_city_bins_full{{{D}}})", instant=True)),
        stat(
            "Parking occupancy",
            prom(
                f"sum(cityops_city_parking_occupied{{{D}}})"
                f" / sum(cityops_city_parking_reporting{{{D}}})",
                instant=True,
            ),
            unit="percentunit",
        ),
        stat("Open tickets", prom(f"sum(cityops_city_tickets_open{{{D},{K}}})", instant=True)),
        stat(
            "Overdue tickets",
            prom(f"sum(cityops_city_tickets_overdue{{{D},{K}}})", instant=True),
            description="Unresolved past their SLA due time.",
        ),
        geomap(),
        bars(
            "Open tickets by district",
            prom(
                f"sum by (district) (cityops_city_tickets_open{{{D},{K}}})",
                "{{district}}",
                instant=True,
            ),
        ),
        bars(
            "Open tickets by priority",
            prom(
                f"sum by (priority) (cityops_city_tickets_open{{{D},{K}}})",
                "{{priority}}",
                instant=True,
            ),
        ),
        bars(
            "Open tickets by department",
            prom(
                f"sum by (department) (cityops_city_tickets_open{{{D},{K}}})",
                "{{department}}",
                instant=True,
            ),
        ),
        table(
            "SLA compliance (tickets opened in the time range)",
            sql(f"""
            SELECT district, priority,
                   count(*) FILTER (WHERE sla = 'met') AS met,
                   count(*) FILTER (WHERE sla = 'missed') AS missed,
                   count(*) FILTER (WHERE sla = 'pending') AS pending,
                   round(100.0 * count(*) FILTER (WHERE sla = 'met')
                         / nullif(count(*) FILTER (WHERE sla <> 'pending'), 0), 1) AS met_pct
            FROM ops.tickets
            WHERE $__timeFilter(opened_at) AND {SQL_D} AND {SQL_K}
            GROUP BY district, priority
            ORDER BY district, priority"""),
            description="met: resolved by due time; missed: resolved late or overdue; "
            "pending: open and not yet due.",
        ),
        table(
            "Unresolved tickets, most urgent first",
            sql(f"""
            SELECT id, device_id, district, rule, priority, department, status,
                   opened_at, due_at, overdue
            FROM ops.tickets
            WHERE unresolved AND {SQL_D} AND {SQL_K}
            ORDER BY overdue DESC, priority, due_at
            LIMIT 200"""),
        ),
        timeseries(
            "Open tickets by priority",
            prom(f"sum by (priority) (cityops_city_tickets_open{{{D},{K}}})", "{{priority}}"),
        ),
        timeseries(
            "Share of street lights out",
            prom(f"cityops:lamps_out:ratio{{{D}}}", "{{district}}"),
            unit="percentunit",
        ),
        timeseries(
            "Bins ≥ 90 % full",
            prom(f"sum by (district) (cityops_city_bins_full{{{D}}})", "{{district}}"),
        ),
        timeseries(
            "Parking occupancy over the day",
            sql(
                f"""
            SELECT $__timeGroupAlias(ts, '15m'), district AS metric,
                   avg(CASE WHEN (reading ->> 'occupied')::boolean THEN 1.0 ELSE 0.0 END)
                       AS occupancy
            FROM ops.readings
            WHERE kind = 'parking' AND $__timeFilter(ts) AND {SQL_D}
            GROUP BY 1, 2
            ORDER BY 1""",
                fmt="time_series",
            ),
            unit="percentunit",
            description="Share of parking readings saying occupied, per 15 minutes "
            "(from the reading history).",
        ),
    ]
    return dashboard("cityops-city", "City operations", panels, time_from="now-24h")


# -- Pipeline health ---------------------------------------------------------------------------


def pipeline_health() -> dict[str, Any]:
    """The platform operator's view: is every message flowing, fast, and accounted for."""
    up_panel = stat("Services up", prom('up{job=~"cityops-.*"}', "{{job}}", instant=True))
    up_panel.width = 8
    up_panel.field_config = {
        "mappings": [
            {
                "type": "value",
                "options": {
                    "0": {"text": "DOWN", "color": "red"},
                    "1": {"text": "UP", "color": "green"},
                },
            }
        ],
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        },
        "color": {"mode": "thresholds"},
    }
    panels = [
        up_panel,
        stat(
            "Reject ratio (5 min)",
            prom("cityops:ingest_reject_ratio:rate5m", instant=True),
            unit="percentunit",
        ),
        stat("In flight (unacked)", prom("sum(cityops_ingest_in_flight_messages)", instant=True)),
        stat(
            "Kafka errors (5 min)",
            prom(
                "sum(increase(cityops_ingest_kafka_errors_total[5m]))"
                ' + sum(increase(cityops_rules_errors_total{dependency="kafka"}[5m]) or vector(0))',
                instant=True,
            ),
        ),
        stat("MQTT connected", prom("sum(cityops_ingest_mqtt_connected)", instant=True)),
        timeseries(
            "Messages in (MQTT received) per second",
            prom(
                f"sum by (kind, channel) (cityops:ingest_received_messages:rate1m{{{K}}})",
                "{{kind}} {{channel}}",
            ),
            unit="reqps",
        ),
        timeseries(
            "Messages out per second",
            prom(
                "sum by (channel) (cityops:ingest_accepted_messages:rate1m)",
                "to Kafka: {{channel}}",
                ref="A",
            ),
            prom("sum(rate(cityops_ingest_acked_messages_total[1m]))", "PUBACK", ref="B"),
            prom(
                "sum by (source) (cityops:api_projector_records:rate1m)",
                "projected: {{source}}",
                ref="C",
            ),
            prom("sum by (topic) (cityops:rules_events:rate1m)", "rules: {{topic}}", ref="D"),
            unit="reqps",
        ),
        timeseries(
            "Rejects by reason",
            prom("sum by (reason) (cityops:ingest_rejected_messages:rate1m)", "{{reason}}"),
            unit="reqps",
        ),
        timeseries(
            "Sensor-to-ingest lag",
            prom("cityops:ingest_sensor_lag_seconds:p50", "p50", ref="A"),
            prom("cityops:ingest_sensor_lag_seconds:p95", "p95", ref="B"),
            prom("cityops:ingest_sensor_lag_seconds:p99", "p99", ref="C"),
            unit="s",
        ),
        timeseries(
            "Produce latency (received → Kafka ack)",
            prom("cityops:ingest_produce_latency_seconds:p50", "p50", ref="A"),
            prom("cityops:ingest_produce_latency_seconds:p95", "p95", ref="B"),
            prom("cityops:ingest_produce_latency_seconds:p99", "p99", ref="C"),
            unit="s",
        ),
        timeseries(
            "Processing latency (received → committed)",
            prom("cityops:rules_processing_latency_seconds:p50", "rules p50", ref="A"),
            prom("cityops:rules_processing_latency_seconds:p95", "rules p95", ref="B"),
            prom("cityops:rules_processing_latency_seconds:p99", "rules p99", ref="C"),
            prom(
                "cityops:api_projector_batch_duration_seconds:p95", "projector batch p95", ref="D"
            ),
            unit="s",
        ),
        timeseries(
            "Consumer lag", prom("cityops:consumer_lag_records:sum", "{{group}}"), unit="short"
        ),
        timeseries(
            "Tickets opened per second",
            prom("sum by (rule) (cityops:rules_tickets_opened:rate5m)", "{{rule}}"),
            unit="reqps",
        ),
        timeseries(
            "API requests per second",
            prom("sum by (status) (cityops:api_requests:rate1m)", "{{status}}"),
            unit="reqps",
        ),
        timeseries(
            "API latency p95 by route",
            prom("cityops:api_request_duration_seconds:p95", "{{route}}"),
            unit="s",
        ),
        timeseries(
            "City gauges refresh duration",
            prom("cityops_city_refresh_duration_seconds", "{{instance}}"),
            unit="s",
        ),
    ]
    return dashboard("cityops-pipeline", "Pipeline health", panels, time_from="now-1h")


# -- One dashboard per kind --------------------------------------------------------------------


def _kind_common(kind: str) -> list[Panel]:
    return [
        stat("Devices", prom(f'sum(cityops_city_devices{{{D},kind="{kind}"}})', instant=True)),
        stat(
            "Online",
            prom(
                f'sum(cityops_city_devices{{{D},kind="{kind}",connectivity="online"}})'
                f' / sum(cityops_city_devices{{{D},kind="{kind}"}})',
                instant=True,
            ),
            unit="percentunit",
        ),
        stat(
            "Open tickets",
            prom(f'sum(cityops_city_tickets_open{{{D},kind="{kind}"}})', instant=True),
        ),
        timeseries(
            "Readings per second",
            prom(
                f'sum(cityops:ingest_accepted_messages:rate1m{{kind="{kind}",channel="telemetry"}})',
                "readings",
            ),
            unit="reqps",
            width=12,
        ),
        timeseries(
            "Devices by connectivity",
            prom(
                f'sum by (connectivity) (cityops_city_devices{{{D},kind="{kind}"}})',
                "{{connectivity}}",
            ),
            width=12,
        ),
        bars(
            "Open tickets by priority",
            prom(
                f'sum by (priority) (cityops_city_tickets_open{{{D},kind="{kind}"}})',
                "{{priority}}",
                instant=True,
            ),
            width=12,
        ),
    ]


def _history(title: str, kind: str, expression: str, unit: str | None = None) -> Panel:
    """A per-district time series from ops.readings."""
    return timeseries(
        title,
        sql(
            f"""
        SELECT $__timeGroupAlias(ts, '5m'), district AS metric, {expression} AS value
        FROM ops.readings
        WHERE kind = '{kind}' AND $__timeFilter(ts) AND {SQL_D}
        GROUP BY 1, 2
        ORDER BY 1""",
            fmt="time_series",
        ),
        unit=unit,
    )


def streetlight() -> list[Panel]:
    """Street lights: lit, faults, power."""
    return [
        stat("Lamps out", prom(f"sum(cityops_city_lamps_out{{{D}}})", instant=True)),
        stat(
            "Share out",
            prom(
                f"sum(cityops_city_lamps_out{{{D}}}) / sum(cityops:streetlights:sum{{{D}}})",
                instant=True,
            ),
            unit="percentunit",
        ),
        _history(
            "Lamps lit",
            "streetlight",
            "avg(CASE WHEN (reading ->> 'lamp_on')::boolean THEN 1.0 ELSE 0.0 END)",
            "percentunit",
        ),
        _history(
            "Power draw (mean)", "streetlight", "avg((reading ->> 'power_w')::float8)", "watt"
        ),
        table(
            "Self-diagnosis now",
            sql(f"""
            SELECT district, coalesce(reading ->> 'fault', 'not reported') AS fault,
                   count(*) AS lamps
            FROM ops.devices
            WHERE kind = 'streetlight' AND {SQL_D}
            GROUP BY 1, 2
            ORDER BY 1, 3 DESC"""),
        ),
    ]


def manhole() -> list[Panel]:
    """Manholes: covers, water, gas."""
    return [
        stat(
            "Covers open",
            sql(f"""
            SELECT count(*) FILTER (WHERE (reading ->> 'cover_open')::boolean) AS covers_open
            FROM ops.devices WHERE kind = 'manhole' AND {SQL_D}"""),
        ),
        _history(
            "Water level (max)",
            "manhole",
            "max((reading ->> 'water_level_pct')::float8)",
            "percent",
        ),
        _history("Gas (max)", "manhole", "max((reading ->> 'gas_ppm')::float8)", "ppm"),
        table(
            "Manholes needing a look (highest water first)",
            sql(f"""
            SELECT device_id, district, (reading ->> 'cover_open')::boolean AS cover_open,
                   (reading ->> 'tilt_deg')::float8 AS tilt_deg,
                   (reading ->> 'water_level_pct')::float8 AS water_level_pct,
                   (reading ->> 'gas_ppm')::float8 AS gas_ppm, connectivity, reading_ts
            FROM ops.devices
            WHERE kind = 'manhole' AND {SQL_D}
            ORDER BY (reading ->> 'cover_open')::boolean DESC NULLS LAST,
                     (reading ->> 'water_level_pct')::float8 DESC NULLS LAST
            LIMIT 50"""),
            width=24,
        ),
    ]


def wastebin() -> list[Panel]:
    """Waste bins: fill levels, fire risk."""
    return [
        stat("Bins ≥ 90 % full", prom(f"sum(cityops_city_bins_full{{{D}}})", instant=True)),
        _history(
            "Fill level (mean)", "wastebin", "avg((reading ->> 'fill_pct')::float8)", "percent"
        ),
        bars(
            "Fill level distribution",
            sql(f"""
            SELECT (width_bucket(fill_pct, 0, 100.0001, 5) - 1) * 20 || '-'
                       || width_bucket(fill_pct, 0, 100.0001, 5) * 20 || ' %' AS fill,
                   count(*) AS bins
            FROM ops.devices
            WHERE kind = 'wastebin' AND fill_pct IS NOT NULL AND {SQL_D}
            GROUP BY 1 ORDER BY 1"""),
            width=12,
        ),
        table(
            "Fullest and hottest bins",
            sql(f"""
            SELECT device_id, district, fill_pct,
                   (reading ->> 'temperature_c')::float8 AS temperature_c,
                   (reading ->> 'tilt_deg')::float8 AS tilt_deg, reading_ts
            FROM ops.devices
            WHERE kind = 'wastebin' AND {SQL_D}
            ORDER BY (reading ->> 'temperature_c')::float8 >= 60 DESC NULLS LAST,
                     fill_pct DESC NULLS LAST
            LIMIT 50"""),
            width=24,
        ),
    ]


def parking() -> list[Panel]:
    """Parking: occupancy now and over the day."""
    return [
        stat(
            "Occupancy",
            prom(
                f"sum(cityops_city_parking_occupied{{{D}}})"
                f" / sum(cityops_city_parking_reporting{{{D}}})",
                instant=True,
            ),
            unit="percentunit",
        ),
        timeseries(
            "Occupancy by district (live)",
            prom(f"cityops:parking_occupancy:ratio{{{D}}}", "{{district}}"),
            unit="percentunit",
        ),
        _history(
            "Occupancy over the day",
            "parking",
            "avg(CASE WHEN (reading ->> 'occupied')::boolean THEN 1.0 ELSE 0.0 END)",
            "percentunit",
        ),
    ]


KIND_DASHBOARDS = {
    "streetlight": ("Street lights", streetlight),
    "manhole": ("Manholes", manhole),
    "wastebin": ("Waste bins", wastebin),
    "parking": ("Parking", parking),
}


def kind_dashboard(kind: str) -> dict[str, Any]:
    """The dashboard of one kind: common signals, then the kind's own."""
    title, specific = KIND_DASHBOARDS[kind]
    return dashboard(
        f"cityops-kind-{kind}",
        title,
        _kind_common(kind) + specific(),
        kinds=(kind,),
        time_from="now-6h",
    )


def all_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    dashboards = {
        "city-operations.json": city_operations(),
        "pipeline-health.json": pipeline_health(),
    }
    dashboards.update({f"kind-{kind}.json": kind_dashboard(kind) for kind in KINDS})
    return dashboards


def render(board: dict[str, Any]) -> str:
    """Stable JSON text of a dashboard."""
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    """Write every dashboard file; print what changed."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name, board in all_dashboards().items():
        path = OUT / name
        text = render(board)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
