"""The running fleet: simulated clock, schedule, early incidents, silence and status messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from cityops.common.events import STATUS_ADAPTER, parse_reading
from cityops.common.kinds import Kind
from cityops.simulator.city import PLACES, build_city
from cityops.simulator.fleet import Fleet, Schedule, SimClock

WALL = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def small_fleet(*, incidents: bool = True, per_kind: int = 10) -> Fleet:
    city = build_city(place=PLACES["barcelona"], devices_per_kind=per_kind, district_count=4)
    return Fleet(city, start=WALL - timedelta(minutes=1), early_incidents=incidents)


def test_an_accelerated_clock_replays_the_last_day_then_runs_live() -> None:
    clock = SimClock.starting(WALL, accelerate=60.0)
    assert clock.now(WALL) == WALL - timedelta(days=1)
    assert clock.now(WALL + timedelta(minutes=1)) == WALL - timedelta(days=1) + timedelta(hours=1)
    # after 24 wall minutes it has caught up, and never runs ahead of the wall clock
    late = WALL + timedelta(minutes=30)
    assert clock.now(late) == late
    assert not clock.caught_up(WALL + timedelta(minutes=23))
    assert clock.caught_up(WALL + timedelta(minutes=25))
    assert not SimClock.starting(WALL, accelerate=1.0).caught_up(late)


def test_a_real_time_clock_is_the_wall_clock() -> None:
    clock = SimClock.starting(WALL, accelerate=1.0)
    assert clock.now(WALL + timedelta(seconds=5)) == WALL + timedelta(seconds=5)


def test_clock_limits() -> None:
    with pytest.raises(ValueError, match="accelerate"):
        SimClock(WALL, WALL, 0.0)
    with pytest.raises(ValueError, match="timezone"):
        SimClock(datetime(2026, 1, 1), WALL, 1.0)


def test_rate_schedule_holds_the_rate_and_visits_every_device() -> None:
    fleet = small_fleet(per_kind=250)  # 1000 devices
    schedule = Schedule.at_rate(fleet, rate=2000.0, start_s=0.0)
    assert schedule.expected_rate() == pytest.approx(2000.0)
    due = schedule.pop_due(1.0, limit=100_000)
    assert 1990 <= len(due) <= 2010
    assert set(due) == set(range(1000))
    assert schedule.next_due_s() > 1.0


def test_natural_schedule_uses_each_kinds_interval() -> None:
    fleet = small_fleet(per_kind=10)
    schedule = Schedule.natural(fleet, accelerate=60.0, start_s=0.0)
    # per device 60/interval per second: parking every 1 s, bins every 10 s, the rest 5 s
    assert schedule.expected_rate() == pytest.approx(10 * (60 / 60 + 60 / 600 + 2 * 60 / 300))
    due = schedule.pop_due(60.0, limit=100_000)
    parking = {i for i, r in enumerate(fleet.devices) if r.device.kind is Kind.PARKING}
    assert sum(1 for i in due if i in parking) == pytest.approx(600, abs=10)


def test_pop_due_respects_the_limit() -> None:
    schedule = Schedule.at_rate(small_fleet(), rate=1000.0, start_s=0.0)
    assert len(schedule.pop_due(10.0, limit=7)) == 7


def test_readings_are_valid_and_seq_counts_up() -> None:
    fleet = small_fleet(incidents=False)
    seqs: dict[str, list[int]] = {}
    for step in range(1, 6):
        for index in range(len(fleet)):
            for message in fleet.report(index, WALL + timedelta(minutes=step)):
                if message.what == "telemetry":
                    reading = parse_reading(message.payload)
                    assert reading.device_id == message.device_id
                    seqs.setdefault(message.device_id, []).append(reading.seq)
    for values in seqs.values():
        assert values == sorted(values) and len(set(values)) == len(values)
    assert fleet.counters.readings >= sum(len(v) for v in seqs.values())


def test_early_incidents_trigger_the_default_rules_in_the_first_minute() -> None:
    fleet = small_fleet(incidents=True)
    readings = [
        orjson.loads(message.payload)
        for index in range(len(fleet))
        for message in fleet.report(index, WALL)
        if message.what == "telemetry"
    ]
    assert any(r.get("temperature_c", 0) >= 60 for r in readings)  # bin_fire
    assert any(r.get("fill_pct", 0) >= 90 for r in readings)  # bin_full
    assert any(r.get("cover_open") for r in readings)  # cover_open
    assert any(r.get("gas_ppm", 0) >= 50 for r in readings)  # gas_hazard
    assert any(r.get("fault") == "lamp_failure" for r in readings)  # lamp_fault
    assert any(r.get("battery_pct", 100) < 15 for r in readings)  # battery_low


def test_a_silent_device_says_offline_once_then_online_when_back() -> None:
    fleet = small_fleet(incidents=True)
    quiet = next(i for i, r in enumerate(fleet.devices) if r.radio.silent_until is not None)
    first = fleet.report(quiet, WALL)
    assert [m.what for m in first] == ["status"]
    assert STATUS_ADAPTER.validate_json(first[0].payload).online is False
    assert fleet.report(quiet, WALL + timedelta(minutes=5)) == []
    back = fleet.report(quiet, WALL + timedelta(hours=9))
    assert back[0].what == "status"
    assert STATUS_ADAPTER.validate_json(back[0].payload).online is True


def test_reading_now_overrides_fields_for_probes() -> None:
    fleet = small_fleet(incidents=False)
    index = next(i for i, r in enumerate(fleet.devices) if r.device.kind is Kind.WASTEBIN)
    message = fleet.reading_now(index, WALL, temperature_c=95.0)
    reading = parse_reading(message.payload)
    assert reading.kind == "wastebin" and reading.temperature_c == 95.0
    assert message.seq == reading.seq == fleet.devices[index].seq
