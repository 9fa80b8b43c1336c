"""The running fleet: simulated time, per-device state, the report schedule and faults.

Still no I/O: `Fleet.report()` advances one device to a moment and returns the MQTT messages
it would publish; the publisher decides when and how they go on the wire.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import orjson

from cityops.common.kinds import Kind, RejectReason
from cityops.common.topics import status_topic, telemetry_topic
from cityops.simulator import faults
from cityops.simulator.behaviours import (
    Environment,
    KindState,
    ManholeState,
    ParkingState,
    Radio,
    StreetlightState,
    WastebinState,
    advance,
    advance_radio,
    common_fields,
    dropout_chance,
    format_ts,
    hours_between,
    kind_fields,
    new_radio,
    new_state,
    rssi_now,
)
from cityops.simulator.city import City, SimDevice

MAX_ACCELERATE = 100_000.0


@dataclass(frozen=True, slots=True)
class SimClock:
    """Simulated time: `accelerate` times faster than the wall clock, from `sim_start`.

    Readings carry simulated time in `ts`, so rules that look at time (overstays, lamps lit
    after dusk, tilts held for a minute) see a coherent day. An accelerated clock starts in
    the past (by default a day back) and is capped at the wall clock: it replays the last
    day in minutes, then runs live, and never stamps a reading in the future (which ingest
    would refuse as clock_skew).
    """

    sim_start: datetime
    wall_start: datetime
    accelerate: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.accelerate <= MAX_ACCELERATE:
            raise ValueError(f"accelerate must be in (0, {MAX_ACCELERATE:g}]")
        if self.sim_start.tzinfo is None or self.wall_start.tzinfo is None:
            raise ValueError("clock times must be timezone-aware")

    @classmethod
    def starting(
        cls, wall_now: datetime, *, accelerate: float, lookback: timedelta | None = None
    ) -> SimClock:
        """A clock that reaches the wall clock after `lookback` (default one simulated day)."""
        if accelerate <= 1.0:
            return cls(wall_now, wall_now, accelerate)
        back = timedelta(days=1) if lookback is None else lookback
        return cls(wall_now - back, wall_now, accelerate)

    def caught_up(self, wall_now: datetime) -> bool:
        """Whether an accelerated clock has reached the wall clock (and now runs live)."""
        return (
            self.accelerate > 1
            and self.sim_start + (wall_now - self.wall_start) * self.accelerate >= wall_now
        )

    def now(self, wall_now: datetime) -> datetime:
        """Simulated time at wall time `wall_now`."""
        simulated = self.sim_start + (wall_now - self.wall_start) * self.accelerate
        return min(simulated, wall_now) if self.accelerate > 1 else simulated


@dataclass(frozen=True, slots=True)
class Outbound:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    device_id: str
    what: str  # "telemetry", "status" or a rejection reason for injected faults
    seq: int | None = None
    online: bool | None = None  # for status messages


@dataclass(slots=True)
class DeviceRuntime:
    """Mutable per-device simulation record (owned by the fleet)."""

    device: SimDevice
    env: Environment
    rng: random.Random
    state: KindState
    radio: Radio
    seq: int = 0
    announced_offline: bool = False


@dataclass(slots=True)
class FleetCounters:
    """What the fleet did, beyond what it published."""

    readings: int = 0
    lost_over_radio: int = 0
    silent_skips: int = 0
    status_messages: int = 0
    faults: int = 0


class Fleet:
    """Every simulated device's state; `report(i, now)` yields device i's messages at `now`."""

    def __init__(
        self,
        city: City,
        *,
        start: datetime,
        early_incidents: bool = True,
        radio_effects: bool = True,
        first_seq: int = 0,
    ) -> None:
        self.city = city
        self.counters = FleetCounters()
        self._radio_effects = radio_effects
        self._ghosts = itertools.count(1)
        self._fault_cursor = 0
        districts = {district.district_id: district for district in city.districts}
        self.devices: list[DeviceRuntime] = []
        for device in city.devices:
            rng = random.Random(f"{city.seed}:{device.device_id}")  # noqa: S311 - a simulation, not crypto
            district = districts[device.district]
            env = Environment(
                place=city.place,
                seed=city.seed,
                district=device.district,
                profile=district.profile,
                circuit=device.circuit,
            )
            failing = device.kind is not Kind.STREETLIGHT and rng.random() < 0.01
            self.devices.append(
                DeviceRuntime(
                    device=device,
                    env=env,
                    rng=rng,
                    state=new_state(device.kind, start, env, rng),
                    radio=new_radio(device.kind, rng, failing_battery=failing),
                    seq=first_seq,
                )
            )
        self.index = {runtime.device.device_id: i for i, runtime in enumerate(self.devices)}
        if early_incidents:
            self._seed_incidents(start)

    def __len__(self) -> int:
        return len(self.devices)

    def _first(self, kind: Kind, nth: int = 0) -> DeviceRuntime | None:
        matches = [r for r in self.devices if r.device.kind is kind]
        return matches[nth % len(matches)] if matches else None

    def _seed_incidents(self, start: datetime) -> None:
        """A few faults from the first minute, so a demo shows tickets right away."""
        if (bin_fire := self._first(Kind.WASTEBIN, 0)) is not None:
            assert isinstance(bin_fire.state, WastebinState)
            bin_fire.state = replace(bin_fire.state, fire_until=start + timedelta(minutes=45))
        if (bin_full := self._first(Kind.WASTEBIN, 1)) is not None:
            assert isinstance(bin_full.state, WastebinState)
            bin_full.state = replace(bin_full.state, fill_pct=93.0)
        if (bin_tipped := self._first(Kind.WASTEBIN, 2)) is not None:
            assert isinstance(bin_tipped.state, WastebinState)
            bin_tipped.state = replace(bin_tipped.state, tilt_deg=75.0)
        if (cover := self._first(Kind.MANHOLE, 0)) is not None:
            assert isinstance(cover.state, ManholeState)
            cover.state = replace(
                cover.state, cover_open=True, tilt_deg=35.0, closes_at=start + timedelta(hours=3)
            )
        if (gas := self._first(Kind.MANHOLE, 1)) is not None:
            assert isinstance(gas.state, ManholeState)
            gas.state = replace(gas.state, gas_until=start + timedelta(hours=1))
        if (lamp := self._first(Kind.STREETLIGHT, 0)) is not None:
            assert isinstance(lamp.state, StreetlightState)
            lamp.state = replace(
                lamp.state, fault="lamp_failure", repaired_at=start + timedelta(hours=30)
            )
        if (car := self._first(Kind.PARKING, 0)) is not None:
            car.state = ParkingState(at=start, occupied=True, leaves_at=start + timedelta(hours=5))
        if (weak := self._first(Kind.PARKING, 1)) is not None:
            weak.radio = replace(weak.radio, battery_pct=14.0, battery_drain_pct_per_h=0.5)
        if (quiet := self._first(Kind.MANHOLE, 2)) is not None:
            quiet.radio = replace(quiet.radio, silent_until=start + timedelta(hours=8))

    def _reading(self, runtime: DeviceRuntime, now: datetime) -> dict[str, Any]:
        device = runtime.device
        runtime.seq += 1
        body = common_fields(
            device_id=device.device_id,
            kind=device.kind,
            seq=runtime.seq,
            now=now,
            radio=runtime.radio,
            rssi_dbm=rssi_now(runtime.radio, runtime.rng),
        )
        body.update(kind_fields(runtime.state, runtime.rng))
        return body

    def _status(self, runtime: DeviceRuntime, *, online: bool, now: datetime) -> Outbound:
        device = runtime.device
        self.counters.status_messages += 1
        return Outbound(
            topic=status_topic(device.kind, device.device_id),
            payload=orjson.dumps({"online": online, "ts": format_ts(now)}),
            device_id=device.device_id,
            what="status",
            online=online,
        )

    def report(self, index: int, now: datetime) -> list[Outbound]:
        """Advance device `index` to `now`; return what it publishes (possibly nothing)."""
        runtime = self.devices[index]
        device = runtime.device
        previous = runtime.state.at
        runtime.state = advance(runtime.state, now=now, env=runtime.env, rng=runtime.rng)
        dt_h = hours_between(previous, now)
        radio = advance_radio(runtime.radio, now=now, dt_h=dt_h, rng=runtime.rng)
        if not self._radio_effects:
            radio = replace(radio, silent_until=None)
        runtime.radio = radio
        out: list[Outbound] = []
        if radio.silent_until is not None:
            self.counters.silent_skips += 1
            if not runtime.announced_offline:
                # the network server notices the device is gone and says so (its last will)
                runtime.announced_offline = True
                out.append(self._status(runtime, online=False, now=now))
            return out
        if runtime.announced_offline:
            runtime.announced_offline = False
            out.append(self._status(runtime, online=True, now=now))
        body = self._reading(runtime, now)
        self.counters.readings += 1
        if self._radio_effects and runtime.rng.random() < dropout_chance(body["rssi_dbm"]):
            self.counters.lost_over_radio += 1  # seq advanced: consumers see the gap
            return out
        out.append(
            Outbound(
                topic=telemetry_topic(device.kind, device.device_id),
                payload=orjson.dumps(body),
                device_id=device.device_id,
                what="telemetry",
                seq=runtime.seq,
            )
        )
        return out

    def reading_now(self, index: int, now: datetime, **overrides: Any) -> Outbound:
        """Device `index`'s reading at `now`, with fields overridden (probes, triggers).

        Always delivered (no dropout), always advances seq; the state is advanced first.
        """
        runtime = self.devices[index]
        runtime.state = advance(runtime.state, now=now, env=runtime.env, rng=runtime.rng)
        body = self._reading(runtime, now)
        body.update(overrides)
        self.counters.readings += 1
        device = runtime.device
        return Outbound(
            topic=telemetry_topic(device.kind, device.device_id),
            payload=orjson.dumps(body),
            device_id=device.device_id,
            what="telemetry",
            seq=runtime.seq,
        )

    def fault(
        self,
        reason: RejectReason,
        *,
        now: datetime,
        wall_now: datetime,
        ghost_prefix: str = "ghost-",
        burst: int = faults.DEFAULT_RATE_LIMIT_BURST,
    ) -> list[Outbound]:
        """Messages that ingest must refuse with `reason`, from a device picked in turn."""
        self._fault_cursor = (self._fault_cursor + 1) % len(self.devices)
        runtime = self.devices[self._fault_cursor]
        other = self.devices[(self._fault_cursor + 1) % len(self.devices)]
        # a fault message never consumes the device's seq, except the rate-limit burst
        # whose readings are real (the head of the burst is accepted)
        body = common_fields(
            device_id=runtime.device.device_id,
            kind=runtime.device.kind,
            seq=runtime.seq,
            now=now,
            radio=runtime.radio,
            rssi_dbm=runtime.radio.rssi_base_dbm,
        )
        body.update(kind_fields(runtime.state, runtime.rng))
        if reason is RejectReason.RATE_LIMITED:
            readings = []
            for _ in range(burst):
                runtime.seq += 1
                readings.append(dict(body, seq=runtime.seq))
            messages = faults.rate_limited(readings)
        elif reason is RejectReason.TOO_LARGE:
            messages = [faults.too_large(body)]
        elif reason is RejectReason.NOT_JSON:
            messages = [faults.not_json(body)]
        elif reason is RejectReason.SCHEMA:
            messages = [faults.schema(body)]
        elif reason is RejectReason.TOPIC:
            messages = [faults.bad_topic(body)]
        elif reason is RejectReason.ID_MISMATCH:
            # same kind on both sides, so only the id disagrees
            same_kind = next(
                (
                    r
                    for r in itertools.chain(self.devices[self._fault_cursor + 1 :], self.devices)
                    if r.device.kind is runtime.device.kind and r is not runtime
                ),
                other,
            )
            messages = [faults.id_mismatch(body, other_device_id=same_kind.device.device_id)]
        elif reason is RejectReason.UNKNOWN_DEVICE:
            ghost = f"{ghost_prefix}{next(self._ghosts):06d}"
            messages = [faults.unknown_device(body, ghost_device_id=ghost)]
        elif reason is RejectReason.TS_OUT_OF_RANGE:
            messages = [faults.ts_out_of_range(body)]
        else:
            messages = [faults.clock_skew(body, wall_now=wall_now)]
        self.counters.faults += len(messages)
        return [
            Outbound(m.topic, m.payload, runtime.device.device_id, m.reason.value) for m in messages
        ]


class Schedule:
    """When each device reports next, in wall-clock seconds (a heap, earliest first).

    Natural mode: every device reports at its kind's interval divided by the acceleration.
    Rate mode: the whole fleet together holds `rate` messages per second, devices in turn.
    """

    def __init__(self, intervals_s: list[float], *, start_s: float) -> None:
        if any(interval <= 0 for interval in intervals_s):
            raise ValueError("intervals must be positive")
        self._intervals = intervals_s
        # golden-ratio phases: a steady rate from the first second, no thundering herd
        self._heap = [
            (start_s + interval * ((i * 0.6180339887) % 1.0), i)
            for i, interval in enumerate(intervals_s)
        ]
        heapq.heapify(self._heap)

    @classmethod
    def natural(cls, fleet: Fleet, *, accelerate: float, start_s: float) -> Schedule:
        """Each device at its reporting interval, sped up by `accelerate`."""
        intervals = [r.device.reporting_interval_s / accelerate for r in fleet.devices]
        return cls(intervals, start_s=start_s)

    @classmethod
    def at_rate(cls, fleet: Fleet, *, rate: float, start_s: float) -> Schedule:
        """All devices in turn at `rate` messages per second in total."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        interval = len(fleet) / rate
        return cls([interval] * len(fleet), start_s=start_s)

    def next_due_s(self) -> float:
        """When the earliest device is due."""
        return self._heap[0][0]

    def pop_due(self, now_s: float, *, limit: int) -> list[int]:
        """Devices due by `now_s` (at most `limit`), each rescheduled one interval later."""
        due: list[int] = []
        heap = self._heap
        while heap and heap[0][0] <= now_s and len(due) < limit:
            at, index = heap[0]
            heapq.heapreplace(heap, (at + self._intervals[index], index))
            due.append(index)
        return due

    def expected_rate(self) -> float:
        """Messages per second this schedule produces on average."""
        return sum(1.0 / interval for interval in self._intervals)
