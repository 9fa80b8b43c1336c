"""`/v1/districts`: districts and their KPI summaries."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from cityops.api.context import Context, Reader
from cityops.api.districts import store as store_districts
from cityops.api.districts.models import DistrictList, DistrictSummary
from cityops.api.http.problems import Problem
from cityops.api.http.responses import json_response

router = APIRouter(prefix="/v1", tags=["districts"])


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


@router.get("/districts", response_model=DistrictList, summary="List districts")
async def list_districts(context: Context, _: Reader) -> dict[str, Any]:
    """Every district with its device counts per kind."""
    rows = await store_districts.list_districts(context.pool)
    return {
        "items": [
            {
                "district": row["district"],
                "name": row["name"],
                "devices": row["devices"],
                "by_kind": orjson.loads(row["by_kind"]),
            }
            for row in rows
        ]
    }


@router.get(
    "/districts/{district}/summary", response_model=DistrictSummary, summary="District KPIs"
)
async def district_summary(
    context: Context,
    _: Reader,
    district: str,
    sla_window_days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> Response:
    """Lights working %, bins ≥ 90 %, parking occupancy %, open tickets, SLA compliance."""
    row = None
    if 1 <= len(district) <= 64:
        # KPIs are computed over every device of the district: at dashboard request rates
        # one computation per district per CITYOPS_API_SUMMARY_CACHE_S serves everyone
        # (`computed_at` says how fresh it is).
        row = await context.summaries.get(
            (district, sla_window_days),
            lambda: store_districts.district_summary(
                context.pool, district=district, sla_window_days=sla_window_days
            ),
        )
    if row is None:
        raise Problem(404, f"no district {district!r}", problem="district-not-found")
    return json_response(
        {
            "district": district,
            "devices": row["devices"],
            "devices_online": row["devices_online"],
            "lights_reporting": row["lights_reporting"],
            "lights_working": row["lights_working"],
            "lights_working_pct": _pct(row["lights_working"], row["lights_reporting"]),
            "bins_reporting": row["bins_reporting"],
            "bins_full": row["bins_full"],
            "bins_full_pct": _pct(row["bins_full"], row["bins_reporting"]),
            "parking_reporting": row["parking_reporting"],
            "parking_occupied": row["parking_occupied"],
            "parking_occupancy_pct": _pct(row["parking_occupied"], row["parking_reporting"]),
            "open_tickets_by_priority": orjson.loads(row["by_priority"]),
            "overdue_tickets": row["overdue"],
            "sla_window_days": sla_window_days,
            "resolved_in_window": row["resolved_in_window"],
            "resolved_within_sla": row["resolved_within_sla"],
            "sla_compliance_pct": _pct(row["resolved_within_sla"], row["resolved_in_window"]),
            "computed_at": row["computed_at"],
        }
    )
