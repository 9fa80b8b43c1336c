"""The rule engine: per-device state plus an event (reading, status, timer) gives decisions.

Pure: no I/O and no clock. Times are float epoch seconds passed in by the caller: a reading's
arrival time (`received_at`, stamped by ingest and carried in the record, so a replay decides
exactly as the first run did) for conditions, durations and liveness, and the caller's wall
clock for timers. The sensor's own `ts` orders readings (with `seq`) and is kept in details;
it is not trusted for durations because device clocks drift.

Decisions are `Raise` (open a ticket, or count one more occurrence on the open one), `Clear`
(auto-resolve) and `Escalate`. Timer requests go to the caller's deadline heap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from astral import Observer
from astral.sun import elevation, sun

from cityops.common.kinds import Kind, Priority
from cityops.rules.config import CompiledRule
from cityops.rules.profiles import Profile
from cityops.rules.timers import TimerKey

IsDark = Callable[[float], bool]

OFFLINE = "offline"
DURATION = "for"
ESCALATE = "escalate"

# How many seqs below a device's highest one rules remembers as seen or not (a bitmap: 32 bytes
# a device). A publisher that resends unacknowledged readings after a reconnect (paho does)
# can deliver seq N before N-k..N-1; a reading further back than this is too late to tell from
# a replay and is ignored (counted as `stale`).
SEEN_WINDOW = 256
_WINDOW_MASK = (1 << SEEN_WINDOW) - 1


def iso(at: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string."""
    return datetime.fromtimestamp(at, UTC).isoformat()


@dataclass(slots=True)
class Observation:
    """One reading from `city.telemetry.v1`, reduced to what rules need."""

    device_id: str
    kind: Kind
    seq: int
    ts: float
    received_at: float
    fields: dict[str, Any]

    def details(self) -> dict[str, Any]:
        """The reading as a ticket records it."""
        return {"seq": self.seq, "ts": iso(self.ts), **self.fields}


@dataclass(slots=True)
class StatusObservation:
    """One status message from `city.status.v1`; `offset` orders a device's status messages."""

    device_id: str
    kind: Kind
    online: bool
    received_at: float
    offset: int


@dataclass(slots=True)
class Pending:
    """A duration rule whose raise condition holds since `since` (arrival time)."""

    since: float
    details: dict[str, Any]


@dataclass(slots=True)
class OpenTicket:
    """A ticket this replica believes unresolved; `ticket_id` is None until the DB assigned it."""

    ticket_id: int | None
    priority: Priority
    opened_at: float
    due_at: float
    escalations: int = 0

    def next_escalation_at(self) -> float:
        """When the ticket escalates next: at due_at, then once per SLA period."""
        period = max(self.due_at - self.opened_at, 1.0)
        return self.due_at + self.escalations * period


@dataclass(slots=True)
class DeviceState:
    """What rules remember about one device of an owned partition."""

    device_id: str
    kind: Kind
    partition: int
    last_seq: int = -1
    # bit i set: seq last_seq - 1 - i was seen (within SEEN_WINDOW)
    seen_below: int = 0
    last_ts: float = 0.0
    last_seen: float = 0.0
    last_status_offset: int = -1
    pending: dict[str, Pending] = field(default_factory=dict)
    open: dict[str, OpenTicket] = field(default_factory=dict)
    # what the database holds: the write fence (a replica whose copy is stale must not write)
    # and how fresh the stored last_seen_at is
    persisted: bool = False
    persisted_seq: int = -1
    persisted_seen_below: bytes | None = None  # as stored (None: a row from before the window)
    persisted_status_offset: int = -1
    persisted_seen: float = 0.0


@dataclass(slots=True)
class Raise:
    """Open a ticket for (device, rule), or add an occurrence to the open one."""

    device_id: str
    kind: Kind
    district: str
    rule: CompiledRule
    at: float
    details: dict[str, Any]


@dataclass(slots=True)
class Clear:
    """Auto-resolve the open ticket of (device, rule)."""

    device_id: str
    rule_id: str
    at: float
    details: dict[str, Any]


@dataclass(slots=True)
class Escalate:
    """Raise the priority of an overdue ticket one step (expected escalation count guards it)."""

    device_id: str
    rule_id: str
    ticket_id: int
    escalations: int
    at: float


Decision = Raise | Clear | Escalate


class Seen(StrEnum):
    """What happened to an incoming event."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    SEQ_RESET = "seq_reset"
    LATE = "late"  # below the highest seq, never seen: evaluated (raises only)
    STALE = "stale"  # further below the highest seq than the window: ignored


@dataclass(slots=True)
class Effects:
    """What a batch of engine calls asks for: decisions, timers, and states to persist."""

    decisions: list[Decision] = field(default_factory=list)
    # timer changes in the order they were asked for; a None deadline cancels
    timers: list[tuple[TimerKey, float | None]] = field(default_factory=list)
    dirty: dict[str, DeviceState] = field(default_factory=dict)
    evaluations: int = 0

    def schedule(self, key: TimerKey, deadline: float) -> None:
        """Ask for a timer at `deadline`."""
        self.timers.append((key, deadline))

    def cancel(self, key: TimerKey) -> None:
        """Ask for a timer to be forgotten."""
        self.timers.append((key, None))

    def touch(self, state: DeviceState) -> None:
        """`state` changed in a way that must be persisted with this batch."""
        self.dirty[state.device_id] = state


class DuskDawn:
    """Whether the city is dark (between civil dusk and dawn), for the city's location."""

    def __init__(self, *, lat: float, lon: float, tz: str) -> None:
        self._observer = Observer(latitude=lat, longitude=lon)
        self._tz = ZoneInfo(tz)
        self._windows: dict[date, tuple[float, float] | bool] = {}

    def _window(self, day: date) -> tuple[float, float] | bool:
        try:
            times = sun(self._observer, date=day, tzinfo=self._tz)
            return times["dawn"].timestamp(), times["dusk"].timestamp()
        except ValueError:
            # Polar day or night: astral finds no dawn/dusk. Dark all day when the sun stays
            # below civil twilight at noon.
            noon = datetime(day.year, day.month, day.day, 12, tzinfo=self._tz)
            return bool(elevation(self._observer, noon) < -6.0)

    def is_dark(self, at: float) -> bool:
        """True between dusk and the next dawn."""
        day = datetime.fromtimestamp(at, self._tz).date()
        window = self._windows.get(day)
        if window is None:
            if len(self._windows) > 400:
                self._windows.clear()
            window = self._windows[day] = self._window(day)
        if isinstance(window, bool):
            return window
        dawn, dusk = window
        return at < dawn or at >= dusk


def _raise(
    state: DeviceState,
    profile: Profile,
    rule: CompiledRule,
    *,
    at: float,
    details: dict[str, Any],
    fx: Effects,
) -> None:
    fx.decisions.append(Raise(state.device_id, profile.kind, profile.district, rule, at, details))
    if rule.id not in state.open:
        due = at + rule.spec.sla_s
        state.open[rule.id] = OpenTicket(None, rule.spec.priority, at, due)
    fx.touch(state)


def _heard(state: DeviceState, profile: Profile, at: float, fx: Effects) -> None:
    """Any message from the device: it is alive, so device_offline clears."""
    state.last_seen = max(state.last_seen, at)
    offline = profile.offline
    if offline is None:
        return
    if offline.id in state.open:
        del state.open[offline.id]
        fx.decisions.append(Clear(state.device_id, offline.id, at, {"reason": "heard_from"}))
        fx.cancel((ESCALATE, state.device_id, offline.id))
        fx.touch(state)
    fx.schedule(
        (OFFLINE, state.device_id, ""), state.last_seen + offline.intervals * profile.interval_s
    )


def on_reading(
    state: DeviceState, profile: Profile, obs: Observation, is_dark: IsDark, fx: Effects
) -> Seen:
    """Apply one reading: de-duplicate by the seqs seen, then evaluate the device's rules."""
    seq = obs.seq
    last = state.last_seq
    if seq > last:
        gap = seq - last
        # the previous highest seq becomes bit gap-1 of the window below the new one
        state.seen_below = (
            ((state.seen_below << 1 | 1) << (gap - 1)) & _WINDOW_MASK
            if last >= 0 and gap <= SEEN_WINDOW
            else 0
        )
        seen = Seen.PROCESSED
    elif seq == last:
        return Seen.DUPLICATE
    elif obs.ts > state.last_ts:
        # A lower seq with a newer measurement time is a device whose counter restarted
        # (reboot, battery swap); a replay, a duplicate or a late resend carries its old time.
        state.seen_below = 0
        seen = Seen.SEQ_RESET
    else:
        return _late(state, profile, obs, is_dark, fx, back=last - seq)
    state.last_seq = seq
    state.last_ts = obs.ts
    _heard(state, profile, obs.received_at, fx)
    for rule in profile.rules:
        _evaluate(state, profile, rule, obs, is_dark=is_dark, fx=fx)
    fx.evaluations += len(profile.rules)
    if seen is Seen.SEQ_RESET:
        fx.touch(state)
    return seen


def _late(
    state: DeviceState,
    profile: Profile,
    obs: Observation,
    is_dark: IsDark,
    fx: Effects,
    *,
    back: int,
) -> Seen:
    """A reading below the highest seq: a repeat, too old to tell, or late and never seen.

    A late reading may raise (open a ticket or count an occurrence): the condition held when it
    was measured. It never clears, starts or ends a duration: the newest reading already set the
    device's current condition, and a stale one must not undo it.
    """
    if back > SEEN_WINDOW:
        return Seen.STALE
    bit = 1 << (back - 1)
    if state.seen_below & bit:
        return Seen.DUPLICATE
    state.seen_below |= bit
    _heard(state, profile, obs.received_at, fx)
    for rule in profile.rules:
        assert rule.raise_when is not None
        if not rule.raise_when.evaluate(obs.fields):
            continue
        if rule.spec.schedule == "dusk_dawn" and not is_dark(obs.received_at):
            continue
        if rule.for_s is None or rule.id in state.open:
            _raise(state, profile, rule, at=obs.received_at, details=obs.details(), fx=fx)
    fx.evaluations += len(profile.rules)
    return Seen.LATE


def _evaluate(
    state: DeviceState,
    profile: Profile,
    rule: CompiledRule,
    obs: Observation,
    *,
    is_dark: IsDark,
    fx: Effects,
) -> None:
    assert rule.raise_when is not None
    holds = rule.raise_when.evaluate(obs.fields)
    if holds and rule.spec.schedule == "dusk_dawn" and not is_dark(obs.received_at):
        holds = False
    pending = state.pending.get(rule.id)
    if holds:
        if rule.id in state.open or rule.for_s is None:
            if pending is not None:
                del state.pending[rule.id]
                fx.cancel((DURATION, state.device_id, rule.id))
            _raise(state, profile, rule, at=obs.received_at, details=obs.details(), fx=fx)
        elif pending is None:
            state.pending[rule.id] = Pending(obs.received_at, obs.details())
            fx.schedule((DURATION, state.device_id, rule.id), obs.received_at + rule.for_s)
            fx.touch(state)
        elif obs.received_at - pending.since >= rule.for_s:
            del state.pending[rule.id]
            fx.cancel((DURATION, state.device_id, rule.id))
            details = {**obs.details(), "since": iso(pending.since)}
            _raise(state, profile, rule, at=obs.received_at, details=details, fx=fx)
        return
    if holds is False and pending is not None:
        del state.pending[rule.id]
        fx.cancel((DURATION, state.device_id, rule.id))
        fx.touch(state)
    if (
        rule.id in state.open
        and rule.clear_when is not None
        and rule.clear_when.evaluate(obs.fields)
    ):
        del state.open[rule.id]
        fx.decisions.append(Clear(state.device_id, rule.id, obs.received_at, obs.details()))
        fx.cancel((ESCALATE, state.device_id, rule.id))
        fx.touch(state)


def on_status(state: DeviceState, profile: Profile, status: StatusObservation, fx: Effects) -> Seen:
    """Apply one status message: online=false raises device_offline, online=true clears it."""
    if status.offset <= state.last_status_offset:
        return Seen.DUPLICATE
    state.last_status_offset = status.offset
    if status.online:
        _heard(state, profile, status.received_at, fx)
        return Seen.PROCESSED
    offline = profile.offline
    if offline is not None:
        fx.cancel((OFFLINE, state.device_id, ""))
        details = {"reason": "status", "online": False, "received_at": iso(status.received_at)}
        _raise(state, profile, offline, at=status.received_at, details=details, fx=fx)
    return Seen.PROCESSED


def on_offline_due(state: DeviceState, profile: Profile, now: float, fx: Effects) -> None:
    """The offline timer fired: raise device_offline if the device is still silent."""
    offline = profile.offline
    if offline is None or offline.id in state.open or state.last_seen <= 0:
        return
    deadline = state.last_seen + offline.intervals * profile.interval_s
    if now < deadline:
        fx.schedule((OFFLINE, state.device_id, ""), deadline)
        return
    heard = state.last_seq >= 0 or state.last_status_offset >= 0
    details = {
        # never_heard: a registry device that has not sent anything since it was watched
        "reason": "silent" if heard else "never_heard",
        "last_seen_at" if heard else "watched_since": iso(state.last_seen),
        "silent_s": round(now - state.last_seen, 3),
        "reporting_interval_s": profile.interval_s,
    }
    _raise(state, profile, offline, at=now, details=details, fx=fx)


def on_duration_due(
    state: DeviceState, profile: Profile, rule_id: str, *, now: float, is_dark: IsDark, fx: Effects
) -> None:
    """A duration rule's timer fired: raise if its condition has held long enough."""
    pending = state.pending.get(rule_id)
    rule = profile.by_id.get(rule_id)
    if pending is None:
        return
    if rule is None or rule.for_s is None:
        del state.pending[rule_id]  # the rule was disabled for this device meanwhile
        fx.touch(state)
        return
    due = pending.since + rule.for_s
    if now < due:
        fx.schedule((DURATION, state.device_id, rule_id), due)
        return
    del state.pending[rule_id]
    fx.touch(state)
    if rule.spec.schedule == "dusk_dawn" and not is_dark(now):
        return  # dawn came first: a lamp that is off by day is no fault
    details = {**pending.details, "since": iso(pending.since)}
    _raise(state, profile, rule, at=now, details=details, fx=fx)


def on_escalation_due(state: DeviceState, rule_id: str, now: float, fx: Effects) -> None:
    """An escalation timer fired: escalate the open ticket once for this SLA period."""
    ticket = state.open.get(rule_id)
    if ticket is None or ticket.ticket_id is None:
        return
    due = ticket.next_escalation_at()
    if now < due:
        fx.schedule((ESCALATE, state.device_id, rule_id), due)
        return
    if ticket.priority is Priority.P1 and ticket.escalations > 0:
        return  # already at the top; the first breach was recorded
    fx.decisions.append(
        Escalate(state.device_id, rule_id, ticket.ticket_id, ticket.escalations, now)
    )
    fx.touch(state)


def forget_timers(state: DeviceState) -> list[TimerKey]:
    """Every timer key a device may own (for releasing a revoked partition)."""
    keys: list[TimerKey] = [(OFFLINE, state.device_id, "")]
    keys += [(DURATION, state.device_id, rule_id) for rule_id in state.pending]
    keys += [(ESCALATE, state.device_id, rule_id) for rule_id in state.open]
    return keys


@dataclass(slots=True)
class Step:
    """Decisions that touch each (device, rule) at most once, so one SQL statement per kind."""

    raises: dict[tuple[str, str], tuple[Raise, int, float]] = field(default_factory=dict)
    clears: dict[tuple[str, str], Clear] = field(default_factory=dict)
    escalations: dict[tuple[str, str], Escalate] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.raises or self.clears or self.escalations)


def plan_steps(decisions: list[Decision]) -> list[Step]:
    """Order decisions into steps; repeated raises of one (device, rule) count as occurrences.

    A (device, rule) that is raised, cleared and raised again in one batch needs three steps
    (open, resolve, open a new ticket) so the database sees them in order.
    """
    steps: list[Step] = []
    last_step: dict[tuple[str, str], tuple[int, str]] = {}
    for decision in decisions:
        if isinstance(decision, Raise):
            key, kind = (decision.device_id, decision.rule.id), "raise"
        elif isinstance(decision, Clear):
            key, kind = (decision.device_id, decision.rule_id), "clear"
        else:
            key, kind = (decision.device_id, decision.rule_id), "escalate"
        previous = last_step.get(key)
        if previous is not None and previous[1] == "raise" and kind == "raise":
            step = steps[previous[0]]
            first, count, _ = step.raises[key]
            step.raises[key] = (first, count + 1, decision.at)
            continue
        index = 0 if previous is None else previous[0] + 1
        while len(steps) <= index:
            steps.append(Step())
        step = steps[index]
        if isinstance(decision, Raise):
            step.raises[key] = (decision, 1, decision.at)
        elif isinstance(decision, Clear):
            step.clears[key] = decision
        else:
            step.escalations[key] = decision
        last_step[key] = (index, kind)
    return steps
