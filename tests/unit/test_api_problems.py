"""problem+json for every error, field-level validation messages, ticket actions, fields."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Query
from pydantic import BaseModel

from cityops.api.devices.models import MEASURE_FIELDS
from cityops.api.http.problems import Problem, field_errors, install_problem_handlers
from cityops.api.tickets.routes import transition_action
from cityops.common.kinds import Kind, TicketStatus


class Body(BaseModel):
    fill_pct: float


def make_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/things")
    async def post_thing(body: Body, limit: int = Query(1, le=10)) -> dict[str, Any]:
        return {"ok": body.fill_pct, "limit": limit}

    @app.get("/conflict")
    async def conflict() -> None:
        raise Problem(409, "stale", problem="stale-version", current_version=3)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    return app


def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://api")


async def test_validation_errors_name_the_field() -> None:
    async with client() as http:
        response = await http.post("/things?limit=11", json={"fill_pct": "full"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {e["field"] for e in body["errors"]} == {"query.limit", "body.fill_pct"}
    assert body["instance"] == "/things"


async def test_problems_carry_extensions_and_404_405_500_are_problems() -> None:
    async with client() as http:
        conflict = (await http.get("/conflict")).json()
        assert conflict["type"].endswith("/stale-version")
        assert conflict["current_version"] == 3
        missing = await http.get("/nowhere")
        assert missing.headers["content-type"] == "application/problem+json"
        assert (await http.put("/conflict")).status_code == 405
        boom = await http.get("/boom")
    assert boom.status_code == 500
    assert "bug" not in boom.text


def test_field_errors_of_a_model_level_error() -> None:
    assert field_errors([{"loc": (), "msg": "lat and lon together"}]) == [
        {"field": "body", "message": "lat and lon together"}
    ]


def test_transition_actions() -> None:
    assert transition_action(TicketStatus.RESOLVED, TicketStatus.OPEN) == "reopened"
    assert transition_action(TicketStatus.OPEN, TicketStatus.ACKNOWLEDGED) == "acknowledged"


def test_measure_fields_are_numbers_and_booleans_of_the_kind() -> None:
    assert MEASURE_FIELDS[Kind.PARKING] == {"occupied", "battery_pct", "rssi_dbm"}
    assert "fault" not in MEASURE_FIELDS[Kind.STREETLIGHT]
    assert "lamp_on" in MEASURE_FIELDS[Kind.STREETLIGHT]
