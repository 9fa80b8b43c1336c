"""The per-kind models: bins fill and are emptied, lights follow dusk and dawn, and the rest."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from astral import Observer
from astral.sun import dawn, dusk

from cityops.common.kinds import Kind
from cityops.simulator.behaviours import (
    Environment,
    ManholeState,
    ParkingState,
    StreetlightState,
    WastebinState,
    advance_manhole,
    advance_parking,
    advance_radio,
    advance_streetlight,
    advance_wastebin,
    chance,
    circuit_power_lost,
    collection_rounds,
    is_dark,
    lamp_schedule,
    new_parking,
    new_radio,
    rain_mm_per_h,
    streetlight_fields,
)
from cityops.simulator.city import PLACES, DistrictProfile, Place

BARCELONA = PLACES["barcelona"]
MADRID = ZoneInfo("Europe/Madrid")
PROFILE = DistrictProfile(
    bin_fill_pct_per_h=4.0, parking_demand=0.8, rain_exposure=1.0, collection_hours=(6.0,)
)
ENV = Environment(place=BARCELONA, seed=3, district="eixample", profile=PROFILE, circuit="c1")


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=MADRID).astimezone(UTC)


def step_bin(
    state: WastebinState, until: datetime, rng: random.Random, step: timedelta
) -> list[WastebinState]:
    states = [state]
    now = state.at
    while now < until:
        now = min(until, now + step)
        states.append(advance_wastebin(states[-1], now=now, env=ENV, rng=rng))
    return states


# --- waste bins ------------------------------------------------------------------------------


def test_a_bin_fills_through_the_day() -> None:
    day = date(2026, 11, 26)
    start = WastebinState(at=local(day, 8), fill_pct=10.0, temperature_c=14.0)
    states = step_bin(start, local(day, 20), random.Random(1), timedelta(minutes=10))
    fills = [s.fill_pct for s in states]
    # 12 daytime hours at ~4 %/h: well filled, and never jumping down without a collection
    assert fills[-1] > 40.0
    assert all(later > earlier - 1.0 for earlier, later in itertools.pairwise(fills))


def test_a_collection_round_empties_the_bin_and_rights_it() -> None:
    day = date(2026, 11, 27)
    before = WastebinState(
        at=local(day, 5, 50), fill_pct=92.0, temperature_c=12.0, lid_open=True, tilt_deg=70.0
    )
    after = advance_wastebin(before, now=local(day, 6, 10), env=ENV, rng=random.Random(2))
    assert after.fill_pct < 5.0
    assert not after.lid_open
    assert after.tilt_deg == 0.0


def test_no_collection_outside_the_rounds() -> None:
    day = date(2026, 11, 27)
    assert collection_rounds(BARCELONA, PROFILE, local(day, 7), local(day, 23)) == []
    rounds = collection_rounds(BARCELONA, PROFILE, local(day, 0), local(day + timedelta(1), 12))
    assert rounds == [local(day, 6), local(day + timedelta(1), 6)]


def test_district_rate_decides_how_fast_bins_fill() -> None:
    day = date(2026, 11, 26)
    busy = replace(ENV, profile=replace(PROFILE, bin_fill_pct_per_h=6.0))
    quiet = replace(ENV, profile=replace(PROFILE, bin_fill_pct_per_h=1.5))
    start = WastebinState(at=local(day, 9), fill_pct=5.0, temperature_c=14.0)
    end = local(day, 15)
    busy_fill = advance_wastebin(start, now=end, env=busy, rng=random.Random(4)).fill_pct
    quiet_fill = advance_wastebin(start, now=end, env=quiet, rng=random.Random(4)).fill_pct
    assert busy_fill > quiet_fill + 15.0


def test_a_bin_fire_heats_it_and_goes_out() -> None:
    day = date(2026, 11, 26)
    burning = WastebinState(
        at=local(day, 12), fill_pct=50.0, temperature_c=15.0, fire_until=local(day, 12, 30)
    )
    hot = advance_wastebin(burning, now=local(day, 12, 10), env=ENV, rng=random.Random(5))
    assert hot.temperature_c >= 60.0
    cold = advance_wastebin(hot, now=local(day, 12, 40), env=ENV, rng=random.Random(5))
    assert cold.temperature_c < 40.0
    assert cold.fire_until is None


def test_fires_tips_and_open_lids_happen_at_their_rates() -> None:
    rng = random.Random(6)
    day = date(2026, 11, 26)
    start = WastebinState(at=local(day, 8), fill_pct=0.0, temperature_c=14.0)
    # a year of bins in one step each: events with rates of 1/500-1/100 per hour show up
    later = [advance_wastebin(start, now=local(day, 8) + timedelta(hours=400), env=ENV, rng=rng)]
    later += [
        advance_wastebin(start, now=start.at + timedelta(hours=400), env=ENV, rng=rng)
        for _ in range(300)
    ]
    assert any(s.tilt_deg >= 45 for s in later)
    assert any(s.lid_open for s in later)
    assert any(s.fire_until is not None for s in later)


# --- street lights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("place", "day"),
    [
        (PLACES["barcelona"], date(2026, 11, 26)),
        (PLACES["barcelona"], date(2026, 6, 21)),
        (PLACES["oslo"], date(2026, 12, 21)),
        (PLACES["new-york"], date(2026, 3, 8)),
    ],
)
def test_lights_switch_on_at_dusk_and_off_at_dawn(place: Place, day: date) -> None:
    tz = ZoneInfo(place.timezone)
    observer = Observer(place.lat, place.lon)
    expected_dawn = dawn(observer, date=day, tzinfo=tz).astimezone(UTC)
    expected_dusk = dusk(observer, date=day, tzinfo=tz).astimezone(UTC)
    assert lamp_schedule(place, day) == (expected_dawn, expected_dusk)
    env = replace(ENV, place=place, circuit=None)
    rng = random.Random(7)
    two = timedelta(minutes=2)

    def lit(at: datetime) -> bool:
        state = StreetlightState(at=at - timedelta(minutes=5), lamp_on=False, dim_pct=0.0)
        return advance_streetlight(state, now=at, env=env, rng=rng).lamp_on

    assert lit(expected_dawn - two)
    assert not lit(expected_dawn + two)
    assert not lit(expected_dusk - two)
    assert lit(expected_dusk + two)
    assert is_dark(place, expected_dusk) and not is_dark(place, expected_dawn)


def test_lights_dim_in_the_quiet_hours() -> None:
    day = date(2026, 11, 26)
    rng = random.Random(8)
    state = StreetlightState(at=local(day, 1, 55), lamp_on=True, dim_pct=100.0)
    env = replace(ENV, circuit=None)
    quiet = advance_streetlight(state, now=local(day, 2), env=env, rng=rng)
    evening = advance_streetlight(state, now=local(day, 21), env=env, rng=rng)
    assert quiet.lamp_on and quiet.dim_pct == 50.0
    assert evening.lamp_on and evening.dim_pct == 100.0
    fields = streetlight_fields(quiet, rng)
    assert fields["power_w"] < streetlight_fields(evening, rng)["power_w"]


def test_a_failed_lamp_is_dark_at_night_until_repaired() -> None:
    day = date(2026, 11, 26)
    env = replace(ENV, circuit=None)
    failed = StreetlightState(
        at=local(day, 21),
        lamp_on=False,
        dim_pct=0.0,
        fault="lamp_failure",
        repaired_at=local(day + timedelta(1), 20),
    )
    rng = random.Random(9)
    still = advance_streetlight(failed, now=local(day, 22), env=env, rng=rng)
    assert not still.lamp_on and streetlight_fields(still, rng)["fault"] == "lamp_failure"
    fixed = advance_streetlight(still, now=local(day + timedelta(1), 21), env=env, rng=rng)
    assert fixed.lamp_on and fixed.fault == "none"


def test_a_circuit_power_loss_darkens_every_light_on_it() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    outage = next(
        start + timedelta(minutes=10 * i)
        for i in range(20_000)
        if circuit_power_lost(seed=3, circuit="c1", when=start + timedelta(minutes=10 * i))
        and is_dark(BARCELONA, start + timedelta(minutes=10 * i))
    )
    rng = random.Random(10)
    state = StreetlightState(at=outage - timedelta(minutes=5), lamp_on=True, dim_pct=100.0)
    dark = advance_streetlight(state, now=outage, env=ENV, rng=rng)
    fields = streetlight_fields(dark, rng)
    assert not dark.lamp_on
    assert fields["fault"] == "power_loss" and fields["voltage_v"] == 0.0
    other_circuit = replace(ENV, circuit="c2-never-the-same-outage")
    assert circuit_power_lost(seed=3, circuit="c1", when=outage)
    lit = advance_streetlight(state, now=outage, env=other_circuit, rng=rng)
    assert lit.lamp_on or circuit_power_lost(
        seed=3, circuit="c2-never-the-same-outage", when=outage
    )


# --- manholes --------------------------------------------------------------------------------


def test_rain_over_a_district_raises_the_water_in_its_shafts() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    storm = next(
        start + timedelta(minutes=5 * i)
        for i in range(50_000)
        if rain_mm_per_h(
            seed=3, district="eixample", exposure=1.0, when=start + timedelta(minutes=5 * i)
        )
        > 25.0
    )
    dry_district = next(
        name
        for name in (f"d{i}" for i in range(1000))
        if all(
            rain_mm_per_h(seed=3, district=name, exposure=1.0, when=storm + timedelta(minutes=m))
            == 0.0
            for m in range(-120, 31, 5)
        )
    )
    start_state = ManholeState(
        at=storm - timedelta(hours=2), water_level_pct=8.0, base_level_pct=8.0
    )
    rng = random.Random(11)
    wet, dry = start_state, start_state
    for minutes in range(-115, 31, 5):
        now = storm + timedelta(minutes=minutes)
        wet = advance_manhole(wet, now=now, env=ENV, rng=rng)
        dry = advance_manhole(dry, now=now, env=replace(ENV, district=dry_district), rng=rng)
    assert wet.water_level_pct > 45.0
    assert dry.water_level_pct < 12.0


def test_covers_lift_and_close_and_gas_comes_and_goes() -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    lifted = ManholeState(
        at=now,
        water_level_pct=10.0,
        base_level_pct=10.0,
        cover_open=True,
        tilt_deg=30.0,
        closes_at=now + timedelta(hours=1),
        gas_until=now + timedelta(minutes=30),
    )
    rng = random.Random(12)
    during = advance_manhole(lifted, now=now + timedelta(minutes=10), env=ENV, rng=rng)
    assert during.cover_open and during.tilt_deg >= 15 and during.gas_ppm >= 50
    after = advance_manhole(during, now=now + timedelta(hours=2), env=ENV, rng=rng)
    assert not after.cover_open and after.tilt_deg < 5 and after.gas_ppm < 20


# --- parking ---------------------------------------------------------------------------------


def test_parking_is_busier_at_noon_than_at_night_and_some_cars_overstay() -> None:
    day = date(2026, 11, 26)
    rng = random.Random(13)
    noon = [new_parking(local(day, 12), ENV, rng) for _ in range(2000)]
    night = [new_parking(local(day, 3), ENV, rng) for _ in range(2000)]
    assert sum(s.occupied for s in noon) > 3 * sum(s.occupied for s in night)
    stays = [s.leaves_at - s.at for s in noon if s.leaves_at is not None]
    assert any(stay > timedelta(hours=2) for stay in stays)
    assert sum(stay <= timedelta(hours=2) for stay in stays) > 0.9 * len(stays)


def test_a_car_leaves_when_its_stay_ends_and_another_arrives() -> None:
    day = date(2026, 11, 26)
    parked = ParkingState(at=local(day, 10), occupied=True, leaves_at=local(day, 11))
    rng = random.Random(14)
    assert advance_parking(parked, now=local(day, 10, 30), env=ENV, rng=rng).occupied
    free = advance_parking(parked, now=local(day, 11, 1), env=ENV, rng=rng)
    assert not free.occupied
    refilled = [advance_parking(free, now=local(day, 13), env=ENV, rng=rng) for _ in range(50)]
    assert any(s.occupied for s in refilled)


# --- radio, battery --------------------------------------------------------------------------


def test_batteries_drain_and_lights_have_none() -> None:
    rng = random.Random(15)
    assert new_radio(Kind.STREETLIGHT, rng).battery_pct is None
    failing = new_radio(Kind.WASTEBIN, rng, failing_battery=True)
    assert failing.battery_pct is not None and failing.battery_pct < 20
    now = datetime(2026, 11, 26, tzinfo=UTC)
    later = advance_radio(failing, now=now, dt_h=3.0, rng=rng)
    assert later.battery_pct is not None and later.battery_pct < 15.0


def test_devices_go_silent_and_come_back() -> None:
    rng = random.Random(16)
    now = datetime(2026, 11, 26, tzinfo=UTC)
    radio = new_radio(Kind.MANHOLE, rng)
    gone = next(
        r
        for r in (advance_radio(radio, now=now, dt_h=5000.0, rng=rng) for _ in range(100))
        if r.silent_until is not None
    )
    assert gone.silent_until is not None
    back = advance_radio(gone, now=gone.silent_until, dt_h=0.1, rng=rng)
    assert back.silent_until is None


def test_chance_does_not_depend_on_step_size() -> None:
    rng = random.Random(17)
    one_step = sum(chance(0.5, 1.0, rng) for _ in range(20_000)) / 20_000
    assert one_step == pytest.approx(0.3935, abs=0.02)
    assert not chance(0.0, 10.0, rng)
    assert not chance(1.0, 0.0, rng)
