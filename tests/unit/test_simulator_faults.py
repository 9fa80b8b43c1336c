"""Each fault flag produces messages that ingest's validation refuses with the right A5 reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cityops.common.kinds import Kind, RejectReason
from cityops.ingest.ratelimit import TokenBuckets
from cityops.ingest.validate import Accepted, Rejected, Validator
from cityops.simulator.city import PLACES, build_city
from cityops.simulator.faults import INJECTABLE, FaultSpecError, parse_fault_spec
from cityops.simulator.fleet import Fleet

NOW = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


class CityRegistry:
    """The registry as ingest would see it after provisioning the simulated city."""

    def __init__(self, kinds: dict[str, Kind]) -> None:
        self._kinds = kinds

    def kind_of(self, device_id: str) -> Kind | None:
        return self._kinds.get(device_id)


@pytest.fixture
def fleet() -> Fleet:
    city = build_city(place=PLACES["barcelona"], devices_per_kind=8, district_count=4, seed=5)
    return Fleet(city, start=NOW - timedelta(hours=1), early_incidents=False)


def validator(fleet: Fleet) -> Validator:
    """Ingest's validation with its default limits (1 reading/s, burst 60)."""
    registry = CityRegistry({r.device.device_id: r.device.kind for r in fleet.devices})
    return Validator(
        registry=registry,
        telemetry_limiter=TokenBuckets(rate_per_s=1.0, burst=60.0),
        status_limiter=TokenBuckets(rate_per_s=1.0, burst=10.0),
        ingest_id="test",
    )


def test_normal_telemetry_of_every_kind_is_accepted(fleet: Fleet) -> None:
    check = validator(fleet)
    accepted: set[str] = set()
    for index in range(len(fleet)):
        for message in fleet.report(index, NOW):
            result = check.validate(message.topic, message.payload, NOW)
            assert isinstance(result, Accepted), (message, result)
            accepted.add(result.kind.value)
    assert accepted == {kind.value for kind in Kind}


@pytest.mark.parametrize("reason", [r for r in INJECTABLE if r is not RejectReason.RATE_LIMITED])
def test_each_fault_is_refused_with_its_reason(fleet: Fleet, reason: RejectReason) -> None:
    check = validator(fleet)
    # several devices in turn, so every kind gets to be the faulty one
    for _ in range(len(fleet)):
        messages = fleet.fault(reason, now=NOW - timedelta(seconds=1), wall_now=NOW)
        assert len(messages) == 1
        result = check.validate(messages[0].topic, messages[0].payload, NOW)
        assert isinstance(result, Rejected), messages[0]
        assert result.reason is reason, result.detail
        assert messages[0].what == reason.value


def test_a_burst_is_partly_accepted_then_rate_limited(fleet: Fleet) -> None:
    check = validator(fleet)
    messages = fleet.fault(RejectReason.RATE_LIMITED, now=NOW, wall_now=NOW, burst=100)
    results = [check.validate(m.topic, m.payload, NOW) for m in messages]
    accepted = [r for r in results if isinstance(r, Accepted)]
    refused = [r for r in results if isinstance(r, Rejected)]
    assert len(accepted) == 60  # ingest's default burst
    assert len(refused) == 40
    assert {r.reason for r in refused} == {RejectReason.RATE_LIMITED}


def test_faults_do_not_break_the_device_sequence(fleet: Fleet) -> None:
    runtime = fleet.devices[1]
    before = runtime.seq
    fleet.fault(RejectReason.SCHEMA, now=NOW, wall_now=NOW)
    assert runtime.seq == before
    fleet.fault(RejectReason.RATE_LIMITED, now=NOW, wall_now=NOW, burst=5)
    assert fleet.devices[2].seq == 5


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ()),
        ("", ()),
        ("all", INJECTABLE),
        ("schema, topic,schema", (RejectReason.SCHEMA, RejectReason.TOPIC)),
    ],
)
def test_parse_fault_spec(spec: str, expected: tuple[RejectReason, ...]) -> None:
    assert parse_fault_spec(spec) == expected


def test_parse_fault_spec_names_the_unknown_fault() -> None:
    with pytest.raises(FaultSpecError, match="'duplicate'"):
        parse_fault_spec("schema,duplicate")
    with pytest.raises(FaultSpecError, match="'retained'"):
        parse_fault_spec("retained")
