"""The simulated city: deterministic, on the street grid, valid registry rows."""

from __future__ import annotations

import math

import pytest

from cityops.common.kinds import Kind
from cityops.common.registry import DEFAULT_REPORTING_INTERVAL_S
from cityops.common.topics import is_valid_device_id
from cityops.simulator.city import (
    EARTH_RADIUS_M,
    PLACES,
    Place,
    build_city,
    grid_shape,
    offset_to_latlon,
)

GRID_PLACE = Place("Gridtown", 45.0, 7.0, "Europe/Rome", 0.0)


def _metres(place: Place, lat: float, lon: float) -> tuple[float, float]:
    north = math.radians(lat - place.lat) * EARTH_RADIUS_M
    east = math.radians(lon - place.lon) * EARTH_RADIUS_M * math.cos(math.radians(place.lat))
    return east, north


def test_same_seed_same_city_other_seed_other_positions() -> None:
    one = build_city(place=PLACES["barcelona"], devices_per_kind=20, seed=7)
    two = build_city(place=PLACES["barcelona"], devices_per_kind=20, seed=7)
    three = build_city(place=PLACES["barcelona"], devices_per_kind=20, seed=8)
    assert one == two
    assert [d.lat for d in one.devices] != [d.lat for d in three.devices]


def test_counts_ids_and_districts() -> None:
    city = build_city(
        place=PLACES["barcelona"], devices_per_kind=25, district_count=6, id_prefix="t1-"
    )
    assert len(city.devices) == 100
    for kind in Kind:
        assert sum(1 for _ in city.by_kind(kind)) == 25
    ids = [device.device_id for device in city.devices]
    assert len(set(ids)) == len(ids)
    assert all(is_valid_device_id(device_id) and device_id.startswith("t1-") for device_id in ids)
    assert [d.district_id for d in city.districts] == list(PLACES["barcelona"].district_names[:6])
    assert {device.district for device in city.devices} == {d.district_id for d in city.districts}


def test_generic_district_names_when_the_preset_has_too_few() -> None:
    city = build_city(place=GRID_PLACE, devices_per_kind=4, district_count=4)
    assert [d.district_id for d in city.districts] == [f"district-0{i}" for i in range(1, 5)]


def test_devices_sit_on_the_street_grid_near_the_centre() -> None:
    block = 100.0
    size = 1000.0
    city = build_city(
        place=GRID_PLACE, devices_per_kind=40, district_count=4, district_size_m=size, block_m=block
    )
    half = 2 * size / 2  # 2 x 2 districts
    for device in city.devices:
        east, north = _metres(GRID_PLACE, device.lat, device.lon)
        assert -half - 1 <= east <= half + 1
        assert -half - 1 <= north <= half + 1
        offset = block / 2 if device.kind is Kind.MANHOLE else 6.0
        on_street = min(abs(((c + half) % block) - offset) for c in (east, north))
        assert on_street < 0.5, device


def test_registry_rows_carry_interval_zone_and_circuit() -> None:
    city = build_city(place=PLACES["amsterdam"], devices_per_kind=3, district_count=2)
    rows = {device.kind: device.to_registry() for device in city.devices}
    for kind, row in rows.items():
        assert row.interval_s == DEFAULT_REPORTING_INTERVAL_S[kind]
        assert -90 <= (row.lat or 0) <= 90
    assert rows[Kind.PARKING].zone is not None
    assert "circuit" in rows[Kind.STREETLIGHT].metadata
    assert rows[Kind.WASTEBIN].metadata["source"] == "simulator"


def test_offsets_convert_to_the_right_distance() -> None:
    lat, lon = offset_to_latlon(GRID_PLACE, east_m=1000.0, north_m=0.0)
    assert _metres(GRID_PLACE, lat, lon) == pytest.approx((1000.0, 0.0), abs=0.01)


@pytest.mark.parametrize(("count", "shape"), [(1, (1, 1)), (9, (3, 3)), (10, (3, 4)), (2, (1, 2))])
def test_grid_shape(count: int, shape: tuple[int, int]) -> None:
    assert grid_shape(count) == shape


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="devices_per_kind"):
        build_city(place=GRID_PLACE, devices_per_kind=0)
    with pytest.raises(ValueError, match="district"):
        grid_shape(0)
