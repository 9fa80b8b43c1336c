"""The city gauges: snapshot -> families, staleness, and the collector in a registry."""

from __future__ import annotations

import time
from typing import cast

import asyncpg
from prometheus_client import CollectorRegistry, generate_latest

from cityops.common.city_metrics import FAMILIES, CityMetrics, CityRow, domain_families


def _row(metric: str, value: float, **labels: str) -> CityRow:
    fields = {"district": "", "kind": "", "connectivity": "", "priority": "", "department": ""}
    fields.update(labels)
    return CityRow(metric=metric, value=value, **fields)


ROWS = [
    _row("devices", 3, district="north", kind="streetlight", connectivity="online"),
    _row("devices", 1, district="north", kind="streetlight", connectivity="offline"),
    _row("lamps_out", 1, district="north", kind="streetlight"),
    _row("bins_full", 0, district="south", kind="wastebin"),
    _row("parking_occupied", 2, district="south", kind="parking"),
    _row("parking_reporting", 5, district="south", kind="parking"),
    _row("tickets_open", 2, district="north", kind="manhole", priority="P1", department="drainage"),
    _row(
        "tickets_overdue", 1, district="north", kind="manhole", priority="P1", department="drainage"
    ),
]


class FakeSession:
    """Stands in for the refresher's dedicated connection: only whether it is open matters."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed


def _leading(metrics: CityMetrics) -> FakeSession:
    session = FakeSession()
    metrics.lead(cast("asyncpg.Connection", session))
    return session


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def test_every_family_is_present_even_without_rows() -> None:
    names = {family.name for family in domain_families(())}
    assert names == {name for name, _, _ in FAMILIES.values()}
    assert all(not family.samples for family in domain_families(()))


def test_rows_become_labelled_samples_with_only_their_labels() -> None:
    families = {family.name: family for family in domain_families(ROWS)}
    (lamps,) = families["cityops_city_lamps_out"].samples
    assert lamps.labels == {"district": "north"}
    assert lamps.value == 1
    devices = {
        sample.labels["connectivity"]: sample.value
        for sample in families["cityops_city_devices"].samples
    }
    assert devices == {"online": 3, "offline": 1}
    (overdue,) = families["cityops_city_tickets_overdue"].samples
    assert overdue.labels == {
        "district": "north",
        "kind": "manhole",
        "priority": "P1",
        "department": "drainage",
    }


def test_unknown_metric_rows_are_ignored() -> None:
    families = domain_families([_row("no_such_metric", 7, district="x")])
    assert all(not family.samples for family in families)


def test_registry_serves_snapshot_and_refresh_health() -> None:
    clock = FakeClock(1_000.0)
    metrics = CityMetrics(interval_s=15, timeout_s=5, clock=clock)
    registry = CollectorRegistry()
    registry.register(metrics)
    _leading(metrics)
    before = _samples(registry)
    assert before[("cityops_city_refresh_timestamp_seconds", frozenset())] == 0
    assert before[("cityops_city_refresher", frozenset())] == 1
    assert not metrics.fresh()

    metrics.store(ROWS, taken_at=clock.now, duration_s=0.02)
    samples = _samples(registry)
    assert samples[("cityops_city_lamps_out", frozenset({("district", "north")}))] == 1
    assert samples[("cityops_city_refresh_timestamp_seconds", frozenset())] == 1_000.0
    assert samples[("cityops_city_refresh_duration_seconds", frozenset())] == 0.02
    assert metrics.fresh()

    metrics.record_error()
    assert _samples(registry)[("cityops_city_refresh_errors_total", frozenset())] == 1


def test_a_stale_snapshot_is_withheld_but_its_age_stays_visible() -> None:
    clock = FakeClock(1_000.0)
    metrics = CityMetrics(interval_s=10, timeout_s=5, clock=clock)
    registry = CollectorRegistry()
    registry.register(metrics)
    _leading(metrics)
    metrics.store(ROWS, taken_at=clock.now, duration_s=0.01)
    clock.now += metrics.max_age_s + 1  # three refreshes missed
    assert not metrics.fresh()
    samples = _samples(registry)
    assert not any(name == "cityops_city_lamps_out" for name, _ in samples)
    assert samples[("cityops_city_refresh_timestamp_seconds", frozenset())] == 1_000.0


def test_exposition_has_no_device_id_label() -> None:
    metrics = CityMetrics()
    _leading(metrics)
    metrics.store(ROWS, taken_at=time.time(), duration_s=0.0)
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    assert "cityops_city_tickets_open{" in text
    assert "device_id" not in text


def test_only_the_refresher_exports_city_gauges_and_a_refresh_time() -> None:
    metrics = CityMetrics()
    registry = CollectorRegistry()
    registry.register(metrics)
    metrics.store(ROWS, taken_at=time.time(), duration_s=0.01)
    standby = _samples(registry)
    assert standby[("cityops_city_refresher", frozenset())] == 0
    assert not any(name.startswith("cityops_city_lamps_out") for name, _ in standby)
    # no refresh time either: max over replicas is the refresher's
    assert ("cityops_city_refresh_timestamp_seconds", frozenset()) not in standby
    assert standby[("cityops_city_refresh_errors_total", frozenset())] == 0

    session = _leading(metrics)
    leading = _samples(registry)
    assert leading[("cityops_city_refresher", frozenset())] == 1
    assert leading[("cityops_city_lamps_out", frozenset({("district", "north")}))] == 1

    session.closed = True  # the lock went with the session: stop exporting at once
    lost = _samples(registry)
    assert lost[("cityops_city_refresher", frozenset())] == 0
    assert not any(name.startswith("cityops_city_lamps_out") for name, _ in lost)
