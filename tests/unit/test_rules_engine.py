"""The pure engine: readings, status and timers in; raise / clear / escalate decisions out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cityops.common.kinds import Kind, Priority
from cityops.rules import engine
from cityops.rules.config import load_rules
from cityops.rules.engine import (
    Clear,
    DeviceState,
    DuskDawn,
    Effects,
    Escalate,
    Observation,
    OpenTicket,
    Raise,
    Seen,
    StatusObservation,
    plan_steps,
)
from cityops.rules.profiles import Profile, ProfileBook

T0 = 1_800_000_000.0
BOOK = ProfileBook(load_rules())


def never_dark(_: float) -> bool:
    return False


def always_dark(_: float) -> bool:
    return True


def profile(kind: Kind, interval_s: float = 60.0, **device_rules: Any) -> Profile:
    built, problems = BOOK.profile(
        kind=kind,
        district="north",
        interval_s=interval_s,
        device_metadata={"rules": device_rules},
    )
    assert problems == []
    return built


def obs(device_id: str, kind: Kind, seq: int, at: float, **fields: Any) -> Observation:
    return Observation(device_id, kind, seq, at, at, fields)


def feed(
    state: DeviceState, prof: Profile, *readings: Observation, dark: Any = never_dark
) -> Effects:
    fx = Effects()
    for reading in readings:
        engine.on_reading(state, prof, reading, dark, fx)
    return fx


def actions(fx: Effects) -> list[tuple[str, str]]:
    out = []
    for d in fx.decisions:
        if isinstance(d, Raise):
            out.append(("raise", d.rule.id))
        elif isinstance(d, Clear):
            out.append(("clear", d.rule_id))
        else:
            out.append(("escalate", d.rule_id))
    return out


def test_threshold_rule_raises_counts_and_clears_with_hysteresis() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = feed(
        state,
        prof,
        obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=50.0),
        obs("wb-1", Kind.WASTEBIN, 2, T0 + 1, fill_pct=92.0),
        obs("wb-1", Kind.WASTEBIN, 3, T0 + 2, fill_pct=97.0),
        obs("wb-1", Kind.WASTEBIN, 4, T0 + 3, fill_pct=60.0),  # between: nothing
        obs("wb-1", Kind.WASTEBIN, 5, T0 + 4, fill_pct=10.0),
    )
    assert actions(fx) == [("raise", "bin_full"), ("raise", "bin_full"), ("clear", "bin_full")]
    raised = fx.decisions[0]
    assert isinstance(raised, Raise)
    assert raised.district == "north"
    assert raised.details["fill_pct"] == 92.0 and raised.details["seq"] == 2
    assert state.open == {}


def test_replayed_and_duplicate_seqs_are_ignored_but_a_counter_reset_is_not() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = Effects()
    first = obs("wb-1", Kind.WASTEBIN, 10, T0, fill_pct=95.0)
    assert engine.on_reading(state, prof, first, never_dark, fx) is Seen.PROCESSED
    assert engine.on_reading(state, prof, first, never_dark, fx) is Seen.DUPLICATE
    older = obs("wb-1", Kind.WASTEBIN, 9, T0 - 5, fill_pct=95.0)
    assert engine.on_reading(state, prof, older, never_dark, fx) is Seen.LATE  # never seen
    assert engine.on_reading(state, prof, older, never_dark, fx) is Seen.DUPLICATE
    rebooted = obs("wb-1", Kind.WASTEBIN, 0, T0 + 60, fill_pct=95.0)
    assert engine.on_reading(state, prof, rebooted, never_dark, fx) is Seen.SEQ_RESET
    assert state.last_seq == 0
    assert state.seen_below == 0
    assert actions(fx) == [("raise", "bin_full")] * 3


def test_a_late_never_seen_reading_raises_once_and_its_repeat_is_ignored() -> None:
    # row 3 of issue 12: a publisher resending after a reconnect delivers 530 before 482-529
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fill = {seq: 95.0 if 490 <= seq <= 495 else 50.0 for seq in range(470, 531)}
    ordered = [*range(470, 482), 530, *range(482, 530)]
    readings = [obs("wb-1", Kind.WASTEBIN, seq, T0 + seq, fill_pct=fill[seq]) for seq in ordered]
    fx = Effects()
    seen = [engine.on_reading(state, prof, r, never_dark, fx) for r in readings]
    assert seen.count(Seen.LATE) == 48
    assert actions(fx) == [("raise", "bin_full")] * 6
    assert state.last_seq == 530
    assert "bin_full" in state.open
    again = Effects()
    assert all(
        engine.on_reading(state, prof, r, never_dark, again) is Seen.DUPLICATE for r in readings
    )
    assert again.decisions == []


def test_a_late_reading_never_clears_what_the_newest_one_holds() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = feed(
        state,
        prof,
        obs("wb-1", Kind.WASTEBIN, 10, T0 + 10, fill_pct=95.0),
        obs("wb-1", Kind.WASTEBIN, 9, T0 + 9, fill_pct=5.0),  # late: emptied, before 10
    )
    assert actions(fx) == [("raise", "bin_full")]
    assert "bin_full" in state.open


def test_the_window_is_bounded_and_slides_with_the_highest_seq() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = feed(state, prof, obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=10.0))
    far = obs("wb-1", Kind.WASTEBIN, 1 + 10 * engine.SEEN_WINDOW, T0 + 100, fill_pct=10.0)
    assert engine.on_reading(state, prof, far, never_dark, fx) is Seen.PROCESSED
    assert state.seen_below == 0  # a jump past the window forgets it
    back = state.last_seq - engine.SEEN_WINDOW - 1
    too_old = obs("wb-1", Kind.WASTEBIN, back, T0 + 50, fill_pct=95.0)
    assert engine.on_reading(state, prof, too_old, never_dark, fx) is Seen.STALE
    edge = obs("wb-1", Kind.WASTEBIN, back + 1, T0 + 50, fill_pct=10.0)
    assert engine.on_reading(state, prof, edge, never_dark, fx) is Seen.LATE
    assert state.seen_below == 1 << (engine.SEEN_WINDOW - 1)
    for seq in range(state.last_seq + 1, state.last_seq + 2 * engine.SEEN_WINDOW):
        feed(state, prof, obs("wb-1", Kind.WASTEBIN, seq, T0 + 200, fill_pct=10.0))
    assert state.seen_below.bit_length() <= engine.SEEN_WINDOW
    assert state.seen_below == (1 << engine.SEEN_WINDOW) - 1


def test_duration_rule_waits_for_its_hold_then_raises_from_the_timer() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = feed(state, prof, obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=5.0, tilt_deg=70.0))
    assert actions(fx) == []
    assert ((engine.DURATION, "wb-1", "bin_tipped"), T0 + 60) in fx.timers
    early = Effects()
    engine.on_duration_due(state, prof, "bin_tipped", now=T0 + 30, is_dark=never_dark, fx=early)
    assert actions(early) == []
    due = Effects()
    engine.on_duration_due(state, prof, "bin_tipped", now=T0 + 60, is_dark=never_dark, fx=due)
    assert actions(due) == [("raise", "bin_tipped")]
    assert "bin_tipped" in state.open
    later = feed(state, prof, obs("wb-1", Kind.WASTEBIN, 2, T0 + 90, fill_pct=5.0, tilt_deg=10.0))
    assert actions(later) == [("clear", "bin_tipped")]


def test_duration_rule_resets_when_the_condition_breaks() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    feed(
        state,
        prof,
        obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=5.0, tilt_deg=70.0),
        obs("wb-1", Kind.WASTEBIN, 2, T0 + 30, fill_pct=5.0, tilt_deg=30.0),  # not >= 45
    )
    fx = Effects()
    engine.on_duration_due(state, prof, "bin_tipped", now=T0 + 61, is_dark=never_dark, fx=fx)
    assert actions(fx) == []
    # a reading that still holds after the hold raises without the timer
    fx = feed(
        state,
        prof,
        obs("wb-1", Kind.WASTEBIN, 3, T0 + 100, fill_pct=5.0, tilt_deg=50.0),
        obs("wb-1", Kind.WASTEBIN, 4, T0 + 161, fill_pct=5.0, tilt_deg=50.0),
    )
    assert actions(fx) == [("raise", "bin_tipped")]


def test_lamp_out_counts_only_while_dark() -> None:
    prof = profile(Kind.STREETLIGHT)
    state = DeviceState("sl-1", Kind.STREETLIGHT, 0)
    by_day = feed(state, prof, obs("sl-1", Kind.STREETLIGHT, 1, T0, lamp_on=False))
    assert by_day.timers == [((engine.OFFLINE, "sl-1", ""), T0 + 180)]
    assert state.pending == {}
    feed(state, prof, obs("sl-1", Kind.STREETLIGHT, 2, T0 + 1, lamp_on=False), dark=always_dark)
    assert "lamp_out" in state.pending
    dawn = Effects()
    engine.on_duration_due(state, prof, "lamp_out", now=T0 + 700, is_dark=never_dark, fx=dawn)
    assert actions(dawn) == [] and state.pending == {}
    feed(state, prof, obs("sl-1", Kind.STREETLIGHT, 3, T0 + 800, lamp_on=False), dark=always_dark)
    night = Effects()
    engine.on_duration_due(state, prof, "lamp_out", now=T0 + 1400, is_dark=always_dark, fx=night)
    assert actions(night) == [("raise", "lamp_out")]


def test_device_override_changes_a_threshold_and_can_disable_a_rule() -> None:
    prof = profile(Kind.WASTEBIN, bin_full={"raise": 80}, battery_low={"enabled": False})
    assert "battery_low" not in prof.by_id
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    fx = feed(state, prof, obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=85.0, battery_pct=3.0))
    assert actions(fx) == [("raise", "bin_full")]


def test_district_and_zone_overrides_rank_below_the_device() -> None:
    district = {
        "rules": {"overstay": {"for_s": 3600}},
        "zones": {"short-stay": {"rules": {"overstay": {"for_s": 900}}}},
    }
    zoned, _ = BOOK.profile(
        kind=Kind.PARKING, zone="short-stay", interval_s=60, district_metadata=district
    )
    plain, _ = BOOK.profile(
        kind=Kind.PARKING, zone="other", interval_s=60, district_metadata=district
    )
    device, _ = BOOK.profile(
        kind=Kind.PARKING,
        zone="short-stay",
        interval_s=60,
        district_metadata=district,
        device_metadata={"rules": {"overstay": {"for_s": 60}}},
    )
    assert zoned.by_id["overstay"].for_s == 900
    assert plain.by_id["overstay"].for_s == 3600
    assert device.by_id["overstay"].for_s == 60
    _, problems = BOOK.profile(
        kind=Kind.PARKING,
        interval_s=60,
        device_metadata={"rules": {"nope": {}, "overstay": {"for_s": -1}}},
    )
    assert len(problems) == 2


def test_offline_timer_raises_once_and_any_message_clears() -> None:
    prof = profile(Kind.PARKING, interval_s=10)
    state = DeviceState("pk-1", Kind.PARKING, 0)
    feed(state, prof, obs("pk-1", Kind.PARKING, 1, T0, occupied=False))
    early = Effects()
    engine.on_offline_due(state, prof, T0 + 29, early)
    assert actions(early) == [] and early.timers == [((engine.OFFLINE, "pk-1", ""), T0 + 30)]
    fx = Effects()
    engine.on_offline_due(state, prof, T0 + 31, fx)
    assert actions(fx) == [("raise", "device_offline")]
    again = Effects()
    engine.on_offline_due(state, prof, T0 + 90, again)
    assert actions(again) == []
    back = feed(state, prof, obs("pk-1", Kind.PARKING, 2, T0 + 100, occupied=False))
    assert actions(back) == [("clear", "device_offline")]


def test_status_offline_raises_and_online_clears_and_replays_are_ignored() -> None:
    prof = profile(Kind.MANHOLE)
    state = DeviceState("mh-1", Kind.MANHOLE, 0)
    fx = Effects()
    down = StatusObservation("mh-1", Kind.MANHOLE, False, T0, offset=5)
    assert engine.on_status(state, prof, down, fx) is Seen.PROCESSED
    assert engine.on_status(state, prof, down, fx) is Seen.DUPLICATE
    up = StatusObservation("mh-1", Kind.MANHOLE, True, T0 + 5, offset=6)
    engine.on_status(state, prof, up, fx)
    assert actions(fx) == [("raise", "device_offline"), ("clear", "device_offline")]


def test_escalation_once_per_sla_period_and_once_at_p1() -> None:
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    state.open["bin_full"] = OpenTicket(7, Priority.P3, T0, T0 + 100, escalations=0)
    fx = Effects()
    engine.on_escalation_due(state, "bin_full", T0 + 99, fx)
    assert fx.decisions == [] and fx.timers == [((engine.ESCALATE, "wb-1", "bin_full"), T0 + 100)]
    fx = Effects()
    engine.on_escalation_due(state, "bin_full", T0 + 100, fx)
    assert fx.decisions == [Escalate("wb-1", "bin_full", 7, 0, T0 + 100)]
    state.open["bin_full"] = OpenTicket(7, Priority.P2, T0, T0 + 100, escalations=1)
    fx = Effects()
    engine.on_escalation_due(state, "bin_full", T0 + 150, fx)
    assert fx.decisions == [] and fx.timers[0][1] == T0 + 200
    state.open["bin_fire"] = OpenTicket(8, Priority.P1, T0, T0 + 100, escalations=1)
    fx = Effects()
    engine.on_escalation_due(state, "bin_fire", T0 + 500, fx)
    assert fx.decisions == []


def test_plan_steps_merges_repeats_and_orders_raise_clear_raise() -> None:
    prof = profile(Kind.WASTEBIN)
    state = DeviceState("wb-1", Kind.WASTEBIN, 0)
    other = DeviceState("wb-2", Kind.WASTEBIN, 1)
    fx = feed(
        state,
        prof,
        obs("wb-1", Kind.WASTEBIN, 1, T0, fill_pct=95.0),
        obs("wb-1", Kind.WASTEBIN, 2, T0 + 1, fill_pct=96.0),
        obs("wb-1", Kind.WASTEBIN, 3, T0 + 2, fill_pct=5.0),
        obs("wb-1", Kind.WASTEBIN, 4, T0 + 3, fill_pct=99.0),
    )
    for i in range(50):
        engine.on_reading(
            other, prof, obs("wb-2", Kind.WASTEBIN, i, T0 + i, fill_pct=95.0), never_dark, fx
        )
    steps = plan_steps(fx.decisions)
    assert len(steps) == 3
    first, count, last = steps[0].raises[("wb-1", "bin_full")]
    assert count == 2 and first.at == T0 and last == T0 + 1
    assert steps[0].raises[("wb-2", "bin_full")][1] == 50
    assert list(steps[1].clears) == [("wb-1", "bin_full")]
    assert steps[2].raises[("wb-1", "bin_full")][1] == 1


def test_dusk_dawn_for_amsterdam() -> None:
    schedule = DuskDawn(lat=52.3731, lon=4.8926, tz="Europe/Amsterdam")
    midsummer_noon = datetime(2026, 6, 21, 10, 0, tzinfo=UTC).timestamp()
    midwinter_evening = datetime(2026, 12, 21, 18, 0, tzinfo=UTC).timestamp()
    winter_morning = datetime(2026, 12, 21, 6, 0, tzinfo=UTC).timestamp()
    assert schedule.is_dark(midsummer_noon) is False
    assert schedule.is_dark(midwinter_evening) is True
    assert schedule.is_dark(winter_morning) is True


@pytest.mark.parametrize(("month", "dark"), [(6, False), (12, True)])
def test_dusk_dawn_polar_day_and_night(month: int, dark: bool) -> None:
    schedule = DuskDawn(lat=78.22, lon=15.65, tz="Arctic/Longyearbyen")  # Svalbard
    noon = datetime(2026, month, 21, 11, 0, tzinfo=UTC).timestamp()
    assert schedule.is_dark(noon) is dark
