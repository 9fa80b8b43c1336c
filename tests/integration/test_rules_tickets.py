"""Every default rule (A6) opens its ticket from real readings and auto-resolves (A7)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from astral import Observer
from astral.sun import elevation

from cityops.common.kinds import Kind
from cityops.common.registry import Device
from tests.integration.kafka_support import StackKafka
from tests.integration.rules_support import (
    Feed,
    make_rules_env,
    reading,
    register,
    running_worker,
    ticket_events,
    tickets,
    transitions,
    wait_ticket,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def night_location() -> dict[str, Any]:
    """A place on the equator where it is the middle of the night now, with its time zone."""
    at = datetime.now(UTC)
    hours = (24 - at.hour) % 24  # local solar time ~ 00:xx at this offset
    offset = hours if hours <= 12 else hours - 24
    lon = float(offset * 15)
    assert elevation(Observer(latitude=0.0, longitude=lon), at) < -12
    zone = f"Etc/GMT{-offset:+d}" if offset else "UTC"
    return {"city_lat": 0.0, "city_lon": lon, "city_tz": zone}


# rule -> (kind, trigger fields, clear fields, priority, department, SLA)
CASES: dict[str, tuple[Kind, dict[str, Any], dict[str, Any], str, str, timedelta]] = {
    "bin_full": (
        Kind.WASTEBIN,
        {"fill_pct": 95.0},
        {"fill_pct": 5.0},
        "P3",
        "sanitation",
        timedelta(hours=4),
    ),
    "bin_fire": (
        Kind.WASTEBIN,
        {"fill_pct": 10.0, "temperature_c": 75.0},
        {"fill_pct": 10.0, "temperature_c": 20.0},
        "P1",
        "sanitation",
        timedelta(minutes=15),
    ),
    "bin_tipped": (
        Kind.WASTEBIN,
        {"fill_pct": 10.0, "tilt_deg": 80.0},
        {"fill_pct": 10.0, "tilt_deg": 2.0},
        "P3",
        "sanitation",
        timedelta(hours=8),
    ),
    "lamp_fault": (
        Kind.STREETLIGHT,
        {"lamp_on": True, "fault": "driver_fault"},
        {"lamp_on": True, "fault": "none"},
        "P3",
        "street_lighting",
        timedelta(hours=48),
    ),
    "lamp_out": (
        Kind.STREETLIGHT,
        {"lamp_on": False},
        {"lamp_on": True},
        "P3",
        "street_lighting",
        timedelta(hours=48),
    ),
    "cover_open": (
        Kind.MANHOLE,
        {"cover_open": True},
        {"cover_open": False, "tilt_deg": 1.0},
        "P1",
        "municipal_works",
        timedelta(hours=1),
    ),
    "overflow_risk": (
        Kind.MANHOLE,
        {"cover_open": False, "water_level_pct": 85.0},
        {"cover_open": False, "water_level_pct": 40.0},
        "P1",
        "drainage",
        timedelta(hours=1),
    ),
    "gas_hazard": (
        Kind.MANHOLE,
        {"cover_open": False, "gas_ppm": 120.0},
        {"cover_open": False, "gas_ppm": 3.0},
        "P1",
        "municipal_works",
        timedelta(minutes=30),
    ),
    "overstay": (
        Kind.PARKING,
        {"occupied": True},
        {"occupied": False},
        "P4",
        "traffic",
        timedelta(hours=1),
    ),
    "battery_low": (
        Kind.PARKING,
        {"occupied": False, "battery_pct": 9.0},
        {"occupied": False, "battery_pct": 80.0},
        "P4",
        "field_service",
        timedelta(days=7),
    ),
}
# duration rules get a 1 s hold through a device override, so the test exercises overrides too
SHORT_HOLD = {"bin_tipped", "lamp_out", "overstay"}


async def test_every_default_rule_opens_and_auto_resolves(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    suffix = uuid.uuid4().hex[:6]
    ids = {rule: f"{rule.replace('_', '-')}-{suffix}" for rule in CASES}
    await register(
        database_url,
        *(
            Device(
                device_id=ids[rule],
                kind=kind,
                district="centrum",
                reporting_interval_s=3600,
                metadata={"rules": {rule: {"for_s": 1}}} if rule in SHORT_HOLD else {},
            )
            for rule, (kind, *_rest) in CASES.items()
        ),
    )
    async with running_worker(env.settings(**night_location())), Feed(env) as feed:
        await feed.readings(
            reading(ids[rule], kind, 1, **trigger)
            for rule, (kind, trigger, *_rest) in CASES.items()
        )
        opened = {}
        for rule, (kind, _, _, priority, department, sla) in CASES.items():
            ticket = await wait_ticket(database_url, device_id=ids[rule], rule=rule)
            assert ticket["status"] == "open"
            assert ticket["priority"] == priority
            assert ticket["department"] == department
            assert ticket["kind"] == kind.value
            assert ticket["district"] == "centrum"
            assert ticket["due_at"] - ticket["opened_at"] == sla
            assert ticket["occurrences"] == 1
            opened[rule] = ticket
        # the duration rules waited for their hold before opening
        assert opened["bin_tipped"]["details"]  # the triggering reading is kept
        await feed.readings(
            reading(ids[rule], kind, 2, **clear) for rule, (kind, _, clear, *_rest) in CASES.items()
        )
        for rule in CASES:
            ticket = await wait_ticket(
                database_url, device_id=ids[rule], rule=rule, status="resolved"
            )
            assert ticket["resolution"] == "auto"
            assert ticket["resolved_at"] >= ticket["opened_at"]
            audit = await transitions(database_url, ticket["id"])
            assert [(t["action"], t["from_status"], t["to_status"]) for t in audit] == [
                ("opened", None, "open"),
                ("auto_resolved", "open", "resolved"),
            ]
            assert all(t["actor"] == "rules" for t in audit)
        events = await ticket_events(env, expect=2 * len(CASES))
    by_ticket: dict[int, list[str]] = {}
    for event in events:
        by_ticket.setdefault(event["ticket_id"], []).append(event["action"])
    assert sorted(by_ticket) == sorted(t["id"] for t in opened.values())
    assert all(actions == ["opened", "auto_resolved"] for actions in by_ticket.values())
    assert len({e["transition_id"] for e in events}) == len(events)
    # nothing but the expected tickets was opened
    assert len(await tickets(database_url)) == len(CASES)


async def test_status_offline_raises_at_once_and_any_message_clears(
    kafka_topics: Any, kafka: StackKafka, database_url: str
) -> None:
    env = await make_rules_env(kafka_topics, kafka, database_url)
    device_id = f"sl-{uuid.uuid4().hex[:8]}"
    await register(
        database_url, Device(device_id=device_id, kind=Kind.STREETLIGHT, reporting_interval_s=600)
    )
    async with running_worker(env.settings()), Feed(env) as feed:
        await feed.status(device_id, Kind.STREETLIGHT, online=False)
        ticket = await wait_ticket(database_url, device_id=device_id, rule="device_offline")
        assert (ticket["priority"], ticket["department"]) == ("P3", "field_service")
        assert ticket["due_at"] - ticket["opened_at"] == timedelta(hours=24)
        assert ticket["district"] == "unassigned"
        await feed.readings([reading(device_id, Kind.STREETLIGHT, 7, lamp_on=True)])
        resolved = await wait_ticket(
            database_url, device_id=device_id, rule="device_offline", status="resolved"
        )
        assert resolved["id"] == ticket["id"]
