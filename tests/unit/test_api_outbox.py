"""The outbox's pure parts: what each API event looks like as a Kafka record, retry backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from cityops.api.outbox.relay import device_events, next_backoff, ticket_event, tombstone_event
from cityops.common.kinds import Priority, TicketStatus
from cityops.common.tickets import TicketEvent

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def registry_row(device_id: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device_id": device_id,
        "kind": "wastebin",
        "district": "north",
        "zone": None,
        "lat": 52.1,
        "lon": 4.3,
        "reporting_interval_s": 300,
        "metadata": '{"fill_alarm_pct": 85}',
        "enabled": True,
        "updated_at": T0,
    }
    row.update(changes)
    return row


def test_device_events_are_keyed_by_device_and_carry_the_registry_document() -> None:
    events = device_events(
        [registry_row("wb-2"), registry_row("wb-1", enabled=False)], topic="city.devices.v1"
    )
    assert [(e.topic, e.key) for e in events] == [
        ("city.devices.v1", "wb-1"),
        ("city.devices.v1", "wb-2"),
    ]
    assert events[0].payload is not None
    document = orjson.loads(events[0].payload)
    assert document == {
        "device_id": "wb-1",
        "kind": "wastebin",
        "district": "north",
        "zone": None,
        "lat": 52.1,
        "lon": 4.3,
        "reporting_interval_s": 300,
        "metadata": {"fill_alarm_pct": 85},
        "enabled": False,
        "updated_at": "2026-11-26T08:00:00+00:00",
    }


def test_no_rows_no_events() -> None:
    assert device_events([], topic="city.devices.v1") == []


def test_a_deleted_device_is_a_tombstone() -> None:
    event = tombstone_event("wb-9", topic="city.devices.v1")
    assert (event.topic, event.key, event.payload) == ("city.devices.v1", "wb-9", None)


def test_a_ticket_event_round_trips_with_its_transition_id() -> None:
    transition = TicketEvent(
        transition_id=41,
        ticket_id=7,
        action="acknowledged",
        at=T0,
        actor="apikey:alice",
        device_id="wb-1",
        kind="wastebin",
        district="north",
        rule="bin_full",
        priority=Priority.P3,
        department="sanitation",
        status=TicketStatus.ACKNOWLEDGED,
        from_status=TicketStatus.OPEN,
        opened_at=T0 - timedelta(hours=1),
        due_at=T0 + timedelta(hours=3),
        occurrences=2,
        version=2,
    )
    event = ticket_event(transition, topic="city.tickets.v1")
    assert (event.topic, event.key) == ("city.tickets.v1", "wb-1")
    assert event.payload is not None
    assert TicketEvent.model_validate_json(event.payload) == transition


@pytest.mark.parametrize(
    ("previous", "cap", "expected"),
    [(0.0, 10.0, 1.0), (1.0, 10.0, 2.0), (4.0, 10.0, 8.0), (8.0, 10.0, 10.0), (10.0, 10.0, 10.0)],
)
def test_backoff_doubles_from_one_second_up_to_the_cap(
    previous: float, cap: float, expected: float
) -> None:
    assert next_backoff(previous, cap_s=cap) == expected


def test_backoff_never_exceeds_a_cap_below_one_second() -> None:
    assert next_backoff(0.0, cap_s=0.5) == 0.5
