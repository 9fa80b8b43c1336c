"""Pure per-kind device models: how each kind of street furniture behaves over time.

Each model is a frozen state plus an `advance_*` function `(state, now, env, rng) -> state`
and a `*_reading` function that renders the state as an A3 payload. Nothing here does I/O
or reads a clock: time comes in as `now` (simulated time), randomness from the `rng` passed
in, and city-wide conditions (rain over a district, power loss on a circuit, collection
rounds, darkness) are deterministic functions of (seed, place, time), so every device in a
district sees the same storm and every light on a circuit the same outage.

Rates are per simulated hour; the probability of an event in a step of `dt` hours is
`1 - exp(-rate * dt)`, so the behaviour does not depend on how often a device reports.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from astral import Observer
from astral.sun import dawn, dusk, elevation

from cityops.common.kinds import Kind
from cityops.simulator.city import DistrictProfile, Place

LampFault = Literal["none", "lamp_failure", "driver_fault", "power_loss"]

# --- event rates per simulated hour (per device unless said otherwise) ----------------------
BIN_FIRE_PER_H = 0.0005
BIN_TIP_PER_H = 0.002
BIN_LID_LEFT_OPEN_PER_H = 0.01
LAMP_FAILURE_PER_H = 0.0005
LAMP_DRIVER_FAULT_PER_H = 0.0002
LAMP_REPAIR_AFTER_H = (24.0, 72.0)
CIRCUIT_OUTAGE_CHANCE_PER_WINDOW = 0.01  # per circuit per 6 h window
COVER_LIFT_PER_H = 0.0005
COVER_LIFT_FLOOD_PER_H = 0.05  # when the shaft is nearly full
GAS_EVENT_PER_H = 0.001
RAIN_CHANCE_PER_WINDOW = 0.12  # per district per 3 h window, times its exposure
PARKING_ARRIVALS_PER_H = 2.0
PARKING_OVERSTAY_SHARE = 0.04
DEVICE_SILENT_PER_H = 0.0002
BATTERY_DRAIN_PCT_PER_DAY: dict[Kind, float] = {
    Kind.MANHOLE: 0.04,
    Kind.WASTEBIN: 0.05,
    Kind.PARKING: 0.03,
}
FAILING_BATTERY_DRAIN_PCT_PER_H = 2.0
LAMP_RATED_W = 60.0
MAINS_V = 230.0


def chance(rate_per_h: float, dt_h: float, rng: random.Random) -> bool:
    """Whether a Poisson event with `rate_per_h` happens in `dt_h` hours."""
    if rate_per_h <= 0 or dt_h <= 0:
        return False
    return rng.random() < 1.0 - math.exp(-rate_per_h * dt_h)


def _stable_random(*parts: object) -> random.Random:
    """A generator seeded by `parts`; the same parts give the same numbers in any process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))  # noqa: S311 - a simulation, not crypto


def hours_between(start: datetime, end: datetime) -> float:
    """Elapsed hours from `start` to `end` (0 when end is earlier)."""
    return max(0.0, (end - start).total_seconds() / 3600.0)


# --- city-wide conditions --------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _twilight(place: Place, local_day: date) -> tuple[datetime | None, datetime | None]:
    """(dawn, dusk) in UTC for a local calendar day; None where the sun never crosses -6 deg."""
    observer = Observer(place.lat, place.lon)
    try:
        start = dawn(observer, date=local_day, tzinfo=ZoneInfo(place.timezone))
        end = dusk(observer, date=local_day, tzinfo=ZoneInfo(place.timezone))
    except ValueError:  # polar day or night: astral cannot find the crossing
        return None, None
    return start.astimezone(UTC), end.astimezone(UTC)


def lamp_schedule(place: Place, local_day: date) -> tuple[datetime | None, datetime | None]:
    """When lights switch off (civil dawn) and on (civil dusk) on a local day, in UTC."""
    return _twilight(place, local_day)


def is_dark(place: Place, when: datetime) -> bool:
    """Whether street lights should be lit: before civil dawn or after civil dusk."""
    local_day = when.astimezone(ZoneInfo(place.timezone)).date()
    start, end = _twilight(place, local_day)
    if start is None or end is None:
        return elevation(Observer(place.lat, place.lon), when, with_refraction=False) < -6.0
    return when < start or when >= end


def local_hour(place: Place, when: datetime) -> float:
    """Hour of day (0-24, fractional) in the city's time zone."""
    local = when.astimezone(ZoneInfo(place.timezone))
    return local.hour + local.minute / 60.0 + local.second / 3600.0


def rain_mm_per_h(*, seed: int, district: str, exposure: float, when: datetime) -> float:
    """Rain intensity over a district: storms come in 3 h windows, shared by the district."""
    window = int(when.timestamp() // (3 * 3600))
    rng = _stable_random("rain", seed, district, window)
    if rng.random() >= RAIN_CHANCE_PER_WINDOW * exposure:
        return 0.0
    peak = rng.uniform(1.0, 30.0)
    start_h, length_h = rng.uniform(0.0, 1.5), rng.uniform(0.5, 1.5)
    into = (when.timestamp() % (3 * 3600)) / 3600.0 - start_h
    if not 0.0 <= into <= length_h:
        return 0.0
    # a storm builds up and dies down: half a sine over its length
    return round(peak * math.sin(math.pi * into / length_h), 2)


def circuit_power_lost(*, seed: int, circuit: str, when: datetime) -> bool:
    """Whether a lighting circuit is without mains power (outages last 20 min to 2 h)."""
    window = int(when.timestamp() // (6 * 3600))
    rng = _stable_random("power", seed, circuit, window)
    if rng.random() >= CIRCUIT_OUTAGE_CHANCE_PER_WINDOW:
        return False
    start_h, length_h = rng.uniform(0.0, 4.0), rng.uniform(1 / 3, 2.0)
    into = (when.timestamp() % (6 * 3600)) / 3600.0 - start_h
    return 0.0 <= into <= length_h


def collection_rounds(
    place: Place, profile: DistrictProfile, start: datetime, end: datetime
) -> list[datetime]:
    """The district's collection rounds in (start, end]; rounds run at fixed local hours."""
    tz = ZoneInfo(place.timezone)
    rounds: list[datetime] = []
    day = start.astimezone(tz).date()
    last_day = end.astimezone(tz).date()
    while day <= last_day:
        midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
        for hour in profile.collection_hours:
            at = (midnight + timedelta(hours=hour)).astimezone(UTC)
            if start < at <= end:
                rounds.append(at)
        day += timedelta(days=1)
    return rounds


@dataclass(frozen=True, slots=True)
class Environment:
    """Where a device is, for the models that depend on place and district."""

    place: Place
    seed: int
    district: str
    profile: DistrictProfile
    circuit: str | None = None


# --- radio and battery, common to every kind -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Radio:
    """Battery and link of a device, shared by all kinds."""

    battery_pct: float | None  # None: mains powered
    battery_drain_pct_per_h: float
    rssi_base_dbm: float
    silent_until: datetime | None = None


def advance_radio(radio: Radio, *, now: datetime, dt_h: float, rng: random.Random) -> Radio:
    """Drain the battery; now and then a device goes silent for 2-24 h (dead cell, vandal)."""
    battery = radio.battery_pct
    if battery is not None:
        battery = max(0.0, battery - radio.battery_drain_pct_per_h * dt_h)
    silent_until = radio.silent_until
    if silent_until is not None and now >= silent_until:
        silent_until = None
    elif silent_until is None and chance(DEVICE_SILENT_PER_H, dt_h, rng):
        silent_until = now + timedelta(hours=rng.uniform(2.0, 24.0))
    return replace(radio, battery_pct=battery, silent_until=silent_until)


def rssi_now(radio: Radio, rng: random.Random) -> float:
    """This reading's signal strength: the link's base plus fading."""
    return round(max(-150.0, min(0.0, radio.rssi_base_dbm + rng.gauss(0.0, 3.0))), 1)


def dropout_chance(rssi_dbm: float) -> float:
    """Chance a reading is lost over the air: low, and much higher near the noise floor."""
    return 0.01 if rssi_dbm > -110.0 else 0.15


def new_radio(kind: Kind, rng: random.Random, *, failing_battery: bool = False) -> Radio:
    """A fresh link: mains-powered lights have no battery; the rest start 40-100 %."""
    if kind is Kind.STREETLIGHT:
        battery: float | None = None
        drain = 0.0
    elif failing_battery:
        battery, drain = rng.uniform(16.0, 19.0), FAILING_BATTERY_DRAIN_PCT_PER_H
    else:
        battery, drain = rng.uniform(40.0, 100.0), BATTERY_DRAIN_PCT_PER_DAY[kind] / 24.0
    base = (
        rng.uniform(-112.0, -65.0)
        if kind in (Kind.MANHOLE, Kind.PARKING)
        else rng.uniform(-95.0, -55.0)
    )
    return Radio(battery, drain, round(base, 1))


def common_fields(
    *, device_id: str, kind: Kind, seq: int, now: datetime, radio: Radio, rssi_dbm: float
) -> dict[str, Any]:
    """The A3 fields every reading has."""
    body: dict[str, Any] = {
        "device_id": device_id,
        "kind": kind.value,
        "ts": format_ts(now),
        "seq": seq,
        "rssi_dbm": rssi_dbm,
    }
    if radio.battery_pct is not None:
        body["battery_pct"] = round(radio.battery_pct, 1)
    return body


def format_ts(when: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a `Z`."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- waste bins ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WastebinState:
    """A waste bin."""

    at: datetime
    fill_pct: float
    temperature_c: float
    lid_open: bool = False
    tilt_deg: float = 0.0
    fire_until: datetime | None = None
    fill_rate_factor: float = 1.0


def ambient_temperature_c(place: Place, when: datetime) -> float:
    """A mild diurnal cycle: coolest before dawn, warmest mid-afternoon."""
    hour = local_hour(place, when)
    return 14.0 + 6.0 * math.sin(math.pi * (hour - 9.0) / 12.0)


def bin_fill_rate_pct_per_h(profile: DistrictProfile, hour: float) -> float:
    """Bins fill fastest around lunch and in the evening, hardly at night."""
    daytime = max(0.1, math.sin(math.pi * (hour - 6.0) / 16.0)) if 6.0 <= hour <= 22.0 else 0.1
    return profile.bin_fill_pct_per_h * daytime * 1.6


def new_wastebin(now: datetime, env: Environment, rng: random.Random) -> WastebinState:
    """A bin somewhere in its cycle."""
    return WastebinState(
        at=now,
        fill_pct=round(rng.uniform(0.0, 85.0), 1),
        temperature_c=ambient_temperature_c(env.place, now),
        fill_rate_factor=rng.uniform(0.6, 1.4),
    )


def advance_wastebin(
    state: WastebinState, *, now: datetime, env: Environment, rng: random.Random
) -> WastebinState:
    """Fill by district rate; a collection round empties the bin and rights it; fire, tip, lid."""
    dt_h = hours_between(state.at, now)
    hour = local_hour(env.place, now)
    fill = state.fill_pct + bin_fill_rate_pct_per_h(env.profile, hour) * state.fill_rate_factor * (
        dt_h
    )
    fill = min(100.0, fill + rng.uniform(-0.3, 0.3))
    lid_open, tilt = state.lid_open, state.tilt_deg
    if collection_rounds(env.place, env.profile, state.at, now):
        fill, lid_open, tilt = rng.uniform(0.0, 4.0), False, 0.0
    if fill >= 99.5 or chance(BIN_LID_LEFT_OPEN_PER_H, dt_h, rng):
        lid_open = True
    if tilt < 1.0 and chance(BIN_TIP_PER_H, dt_h, rng):
        tilt = rng.uniform(60.0, 90.0)
    fire_until = state.fire_until
    if fire_until is not None and now >= fire_until:
        fire_until = None
    elif fire_until is None and chance(BIN_FIRE_PER_H, dt_h, rng):
        fire_until = now + timedelta(minutes=rng.uniform(20.0, 60.0))
    ambient = ambient_temperature_c(env.place, now) + rng.uniform(-0.5, 0.5)
    temperature = rng.uniform(70.0, 160.0) if fire_until is not None else ambient
    return WastebinState(
        at=now,
        fill_pct=max(0.0, fill),
        temperature_c=temperature,
        lid_open=lid_open,
        tilt_deg=tilt,
        fire_until=fire_until,
        fill_rate_factor=state.fill_rate_factor,
    )


def wastebin_fields(state: WastebinState) -> dict[str, Any]:
    """The kind-specific A3 fields of a bin."""
    return {
        "fill_pct": round(state.fill_pct, 1),
        "temperature_c": round(state.temperature_c, 1),
        "lid_open": state.lid_open,
        "tilt_deg": round(state.tilt_deg, 1),
    }


# --- street lights -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreetlightState:
    """A street light."""

    at: datetime
    lamp_on: bool
    dim_pct: float
    fault: LampFault = "none"
    repaired_at: datetime | None = None
    power_lost: bool = False


def night_dim_pct(place: Place, when: datetime) -> float:
    """Dim to 50 % in the quiet hours (00:00-05:00 local), full output otherwise."""
    return 50.0 if local_hour(place, when) < 5.0 else 100.0


def new_streetlight(now: datetime, env: Environment, rng: random.Random) -> StreetlightState:
    """A working light, lit if it is dark."""
    del rng
    dark = is_dark(env.place, now)
    return StreetlightState(
        at=now, lamp_on=dark, dim_pct=night_dim_pct(env.place, now) if dark else 0.0
    )


def advance_streetlight(
    state: StreetlightState, *, now: datetime, env: Environment, rng: random.Random
) -> StreetlightState:
    """Follow dusk and dawn, dim at night; lamps fail and get repaired; circuits lose power."""
    dt_h = hours_between(state.at, now)
    fault: LampFault = state.fault
    repaired_at = state.repaired_at
    if fault in ("lamp_failure", "driver_fault"):
        if repaired_at is not None and now >= repaired_at:
            fault, repaired_at = "none", None
    elif chance(LAMP_FAILURE_PER_H, dt_h, rng):
        fault = "lamp_failure"
        repaired_at = now + timedelta(hours=rng.uniform(*LAMP_REPAIR_AFTER_H))
    elif chance(LAMP_DRIVER_FAULT_PER_H, dt_h, rng):
        fault = "driver_fault"
        repaired_at = now + timedelta(hours=rng.uniform(*LAMP_REPAIR_AFTER_H))
    power_lost = env.circuit is not None and circuit_power_lost(
        seed=env.seed, circuit=env.circuit, when=now
    )
    dark = is_dark(env.place, now)
    lamp_on = dark and fault == "none" and not power_lost
    return StreetlightState(
        at=now,
        lamp_on=lamp_on,
        dim_pct=night_dim_pct(env.place, now) if lamp_on else 0.0,
        fault=fault,
        repaired_at=repaired_at,
        power_lost=power_lost,
    )


def streetlight_fields(state: StreetlightState, rng: random.Random) -> dict[str, Any]:
    """The kind-specific A3 fields of a light; the controller runs on a backup cell."""
    voltage = 0.0 if state.power_lost else MAINS_V + rng.uniform(-4.0, 4.0)
    power = LAMP_RATED_W * state.dim_pct / 100.0 + 1.5 if state.lamp_on else 0.4
    fault: LampFault = "power_loss" if state.power_lost else state.fault
    return {
        "lamp_on": state.lamp_on,
        "dim_pct": state.dim_pct,
        "power_w": 0.0 if state.power_lost else round(power, 1),
        "voltage_v": round(voltage, 1),
        "fault": fault,
    }


# --- manholes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManholeState:
    """A manhole cover and its shaft."""

    at: datetime
    water_level_pct: float
    base_level_pct: float
    cover_open: bool = False
    tilt_deg: float = 0.0
    closes_at: datetime | None = None
    gas_ppm: float = 0.0
    gas_until: datetime | None = None


def new_manhole(now: datetime, env: Environment, rng: random.Random) -> ManholeState:
    """A dry, closed shaft."""
    del env
    base = rng.uniform(3.0, 15.0)
    return ManholeState(at=now, water_level_pct=base, base_level_pct=base)


def advance_manhole(
    state: ManholeState, *, now: datetime, env: Environment, rng: random.Random
) -> ManholeState:
    """Water follows the district's rain (30 min lag); covers lift; gas builds up now and then."""
    dt_h = hours_between(state.at, now)
    rain = rain_mm_per_h(
        seed=env.seed, district=env.district, exposure=env.profile.rain_exposure, when=now
    )
    target = min(100.0, state.base_level_pct + rain * 3.2 * env.profile.rain_exposure)
    relax = 1.0 - math.exp(-dt_h / 0.5)
    water = state.water_level_pct + (target - state.water_level_pct) * relax
    water = max(0.0, min(100.0, water + rng.uniform(-0.5, 0.5)))

    cover_open, tilt, closes_at = state.cover_open, state.tilt_deg, state.closes_at
    if cover_open and closes_at is not None and now >= closes_at:
        cover_open, tilt, closes_at = False, 0.0, None
    elif not cover_open:
        rate = COVER_LIFT_FLOOD_PER_H if water >= 90.0 else COVER_LIFT_PER_H
        if chance(rate, dt_h, rng):
            cover_open, tilt = True, rng.uniform(15.0, 80.0)
            closes_at = now + timedelta(hours=rng.uniform(1.0, 6.0))

    gas, gas_until = state.gas_ppm, state.gas_until
    if gas_until is not None and now >= gas_until:
        gas_until = None
    elif gas_until is None and chance(GAS_EVENT_PER_H, dt_h, rng):
        gas_until = now + timedelta(minutes=rng.uniform(30.0, 90.0))
    gas = rng.uniform(60.0, 300.0) if gas_until is not None else rng.uniform(0.0, 4.0)
    return ManholeState(
        at=now,
        water_level_pct=water,
        base_level_pct=state.base_level_pct,
        cover_open=cover_open,
        tilt_deg=tilt,
        closes_at=closes_at,
        gas_ppm=gas,
        gas_until=gas_until,
    )


def manhole_fields(state: ManholeState) -> dict[str, Any]:
    """The kind-specific A3 fields of a manhole."""
    return {
        "cover_open": state.cover_open,
        "tilt_deg": round(state.tilt_deg, 1),
        "water_level_pct": round(state.water_level_pct, 1),
        "gas_ppm": round(state.gas_ppm, 1),
    }


# --- parking -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParkingState:
    """A parking spot."""

    at: datetime
    occupied: bool
    leaves_at: datetime | None = None


def parking_demand(profile: DistrictProfile, hour: float) -> float:
    """Relative demand by hour: busy during office and shopping hours, low at night."""
    if 8.0 <= hour < 19.0:
        shape = 1.0
    elif 19.0 <= hour < 23.0:
        shape = 0.6
    else:
        shape = 0.15
    return profile.parking_demand * shape


def _stay(now: datetime, rng: random.Random) -> datetime:
    if rng.random() < PARKING_OVERSTAY_SHARE:
        hours = rng.uniform(2.5, 6.0)  # past the zone's 2 h limit
    else:
        hours = min(1.9, rng.lognormvariate(math.log(0.8), 0.6))
    return now + timedelta(hours=hours)


def new_parking(now: datetime, env: Environment, rng: random.Random) -> ParkingState:
    """A spot, occupied as often as the hour and district suggest."""
    occupied = rng.random() < parking_demand(env.profile, local_hour(env.place, now))
    return ParkingState(at=now, occupied=occupied, leaves_at=_stay(now, rng) if occupied else None)


def advance_parking(
    state: ParkingState, *, now: datetime, env: Environment, rng: random.Random
) -> ParkingState:
    """Cars leave when their stay ends; free spots fill at the hour's arrival rate."""
    dt_h = hours_between(state.at, now)
    if state.occupied and state.leaves_at is not None and now >= state.leaves_at:
        return ParkingState(at=now, occupied=False)
    if not state.occupied:
        rate = PARKING_ARRIVALS_PER_H * parking_demand(env.profile, local_hour(env.place, now))
        if chance(rate, dt_h, rng):
            return ParkingState(at=now, occupied=True, leaves_at=_stay(now, rng))
    return replace(state, at=now)


def parking_fields(state: ParkingState) -> dict[str, Any]:
    """The kind-specific A3 fields of a spot."""
    return {"occupied": state.occupied}


KindState = WastebinState | StreetlightState | ManholeState | ParkingState


def new_state(kind: Kind, now: datetime, env: Environment, rng: random.Random) -> KindState:
    """A fresh state for a device of `kind`."""
    if kind is Kind.WASTEBIN:
        return new_wastebin(now, env, rng)
    if kind is Kind.STREETLIGHT:
        return new_streetlight(now, env, rng)
    if kind is Kind.MANHOLE:
        return new_manhole(now, env, rng)
    return new_parking(now, env, rng)


def advance(state: KindState, *, now: datetime, env: Environment, rng: random.Random) -> KindState:
    """Advance any kind's state to `now`."""
    if isinstance(state, WastebinState):
        return advance_wastebin(state, now=now, env=env, rng=rng)
    if isinstance(state, StreetlightState):
        return advance_streetlight(state, now=now, env=env, rng=rng)
    if isinstance(state, ManholeState):
        return advance_manhole(state, now=now, env=env, rng=rng)
    return advance_parking(state, now=now, env=env, rng=rng)


def kind_fields(state: KindState, rng: random.Random) -> dict[str, Any]:
    """The kind-specific A3 fields of any state."""
    if isinstance(state, WastebinState):
        return wastebin_fields(state)
    if isinstance(state, StreetlightState):
        return streetlight_fields(state, rng)
    if isinstance(state, ManholeState):
        return manhole_fields(state)
    return parking_fields(state)
