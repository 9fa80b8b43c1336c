"""A simulated city: districts on a grid around a real centre, devices placed along its streets.

Everything here is deterministic from a seed, so a test, the demo and a benchmark run see the
same city. Positions are computed on a local flat-earth plane (metres east/north of the centre,
rotated by the street grid's bearing) and converted to WGS84; over a few kilometres the error
of the equirectangular approximation is far below a device's GPS accuracy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cityops.common.kinds import Kind
from cityops.common.registry import DEFAULT_REPORTING_INTERVAL_S, Device

EARTH_RADIUS_M = 6_371_008.8
KIND_PREFIX: dict[Kind, str] = {
    Kind.STREETLIGHT: "sl",
    Kind.MANHOLE: "mh",
    Kind.WASTEBIN: "wb",
    Kind.PARKING: "pk",
}
MAX_DEVICES_PER_KIND = 1_000_000


@dataclass(frozen=True, slots=True)
class Place:
    """A real city centre: where the sun rises and sets, and how its streets run."""

    name: str
    lat: float
    lon: float
    timezone: str
    street_bearing_deg: float = 0.0
    district_names: tuple[str, ...] = ()


PLACES: dict[str, Place] = {
    # Cerdà's Eixample grid runs about 45 degrees off north.
    "barcelona": Place(
        "Barcelona",
        41.3874,
        2.1686,
        "Europe/Madrid",
        44.7,
        (
            "ciutat-vella",
            "eixample",
            "sants-montjuic",
            "les-corts",
            "sarria-sant-gervasi",
            "gracia",
            "horta-guinardo",
            "nou-barris",
            "sant-andreu",
            "sant-marti",
        ),
    ),
    "amsterdam": Place(
        "Amsterdam",
        52.3731,
        4.8926,
        "Europe/Amsterdam",
        0.0,
        ("centrum", "west", "nieuw-west", "zuid", "oost", "noord", "zuidoost", "westpoort"),
    ),
    "oslo": Place("Oslo", 59.9139, 10.7522, "Europe/Oslo", 0.0),
    "new-york": Place(
        "New York",
        40.7580,
        -73.9855,
        "America/New_York",
        29.0,
        ("midtown", "chelsea", "soho", "tribeca", "harlem", "upper-east", "upper-west"),
    ),
}
DEFAULT_PLACE = "amsterdam"  # the rules service's default city (CITYOPS_CITY_*)


@dataclass(frozen=True, slots=True)
class DistrictProfile:
    """How busy a district is; drives bin fill rates, parking demand and rain exposure."""

    bin_fill_pct_per_h: float
    parking_demand: float
    rain_exposure: float
    collection_hours: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class District:
    """One square district of the grid."""

    district_id: str
    row: int
    col: int
    lat: float
    lon: float
    profile: DistrictProfile


@dataclass(frozen=True, slots=True)
class SimDevice:
    """A simulated device: its registry row plus what the simulation needs to know about it."""

    device_id: str
    kind: Kind
    district: str
    lat: float
    lon: float
    reporting_interval_s: int
    zone: str | None = None
    circuit: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_registry(self) -> Device:
        """The row this device gets in the registry."""
        metadata = dict(self.metadata)
        if self.circuit is not None:
            metadata["circuit"] = self.circuit
        metadata.setdefault("source", "simulator")
        return Device(
            device_id=self.device_id,
            kind=self.kind,
            district=self.district,
            zone=self.zone,
            lat=round(self.lat, 7),
            lon=round(self.lon, 7),
            reporting_interval_s=self.reporting_interval_s,
            metadata=metadata,
        )


@dataclass(frozen=True, slots=True)
class City:
    """The simulated city."""

    place: Place
    seed: int
    districts: tuple[District, ...]
    devices: tuple[SimDevice, ...]

    def district(self, district_id: str) -> District:
        """Look a district up by id."""
        for district in self.districts:
            if district.district_id == district_id:
                return district
        raise KeyError(district_id)

    def by_kind(self, kind: Kind) -> Iterator[SimDevice]:
        """The devices of one kind."""
        return (device for device in self.devices if device.kind is kind)


def offset_to_latlon(place: Place, *, east_m: float, north_m: float) -> tuple[float, float]:
    """Convert a metre offset from the centre into latitude/longitude."""
    lat = place.lat + math.degrees(north_m / EARTH_RADIUS_M)
    lon = place.lon + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(place.lat))))
    return lat, lon


def _rotate(place: Place, x_m: float, y_m: float) -> tuple[float, float]:
    """Grid coordinates (x along the streets, y along the avenues) to east/north metres."""
    theta = math.radians(place.street_bearing_deg)
    east = x_m * math.cos(theta) + y_m * math.sin(theta)
    north = -x_m * math.sin(theta) + y_m * math.cos(theta)
    return east, north


def grid_shape(district_count: int) -> tuple[int, int]:
    """The most square rows x cols grid holding `district_count` districts."""
    if district_count < 1:
        raise ValueError("a city needs at least one district")
    rows = max(1, math.isqrt(district_count))
    cols = math.ceil(district_count / rows)
    return rows, cols


def _district_ids(place: Place, count: int) -> list[str]:
    if count <= len(place.district_names):
        return list(place.district_names[:count])
    return [f"district-{index + 1:02d}" for index in range(count)]


def _profile(rng: random.Random, *, centrality: float) -> DistrictProfile:
    """Central districts fill bins faster, park fuller and get two collection rounds."""
    first_round = rng.choice((5.0, 5.5, 6.0, 6.5))
    rounds = (first_round, first_round + 9.0) if centrality > 0.5 else (first_round,)
    return DistrictProfile(
        bin_fill_pct_per_h=round(1.5 + 4.0 * centrality + rng.uniform(0.0, 1.0), 2),
        parking_demand=round(0.35 + 0.5 * centrality + rng.uniform(-0.05, 0.05), 3),
        rain_exposure=round(rng.uniform(0.6, 1.4), 2),
        collection_hours=rounds,
    )


def build_city(
    *,
    place: Place,
    devices_per_kind: int,
    district_count: int = 9,
    district_size_m: float = 1200.0,
    block_m: float = 113.3,
    seed: int = 1,
    id_prefix: str = "",
    lights_per_circuit: int = 24,
) -> City:
    """Lay out `district_count` districts around the centre and `devices_per_kind` of each kind.

    Devices sit on the street grid (every `block_m`, the Eixample's block pitch): lights and
    manholes along the streets, bins and parking at kerbs near corners. Device ids are
    `<prefix><kind prefix>-<n>`, e.g. `wb-000042`.
    """
    if not 0 < devices_per_kind <= MAX_DEVICES_PER_KIND:
        raise ValueError(f"devices_per_kind must be 1..{MAX_DEVICES_PER_KIND}")
    rng = random.Random(f"city:{seed}")  # noqa: S311 - a simulation, not crypto
    rows, cols = grid_shape(district_count)
    ids = _district_ids(place, district_count)
    districts: list[District] = []
    half_w, half_h = cols * district_size_m / 2, rows * district_size_m / 2
    for index, district_id in enumerate(ids):
        row, col = divmod(index, cols)
        x = (col + 0.5) * district_size_m - half_w
        y = (row + 0.5) * district_size_m - half_h
        distance = math.hypot(x, y) / max(math.hypot(half_w, half_h), 1.0)
        east, north = _rotate(place, x, y)
        lat, lon = offset_to_latlon(place, east_m=east, north_m=north)
        districts.append(
            District(district_id, row, col, lat, lon, _profile(rng, centrality=1.0 - distance))
        )

    digits = max(6, len(str(devices_per_kind)))
    devices: list[SimDevice] = []
    for kind in Kind:
        for number in range(devices_per_kind):
            district = districts[number % len(districts)]
            x0 = district.col * district_size_m - half_w
            y0 = district.row * district_size_m - half_h
            blocks = max(1, int(district_size_m // block_m))
            # alternate between streets (constant y) and avenues (constant x)
            along = rng.uniform(0.0, district_size_m)
            line = rng.randrange(blocks) * block_m + (block_m / 2 if kind is Kind.MANHOLE else 6.0)
            x, y = (x0 + along, y0 + line) if number % 2 == 0 else (x0 + line, y0 + along)
            east, north = _rotate(place, x, y)
            lat, lon = offset_to_latlon(place, east_m=east, north_m=north)
            device_id = f"{id_prefix}{KIND_PREFIX[kind]}-{number + 1:0{digits}d}"
            sequence_in_district = number // len(districts)
            zone = circuit = None
            if kind is Kind.PARKING:
                zone = f"{district.district_id}-z{sequence_in_district // 50 + 1}"
            elif kind is Kind.STREETLIGHT:
                circuit = (
                    f"{district.district_id}-c{sequence_in_district // lights_per_circuit + 1}"
                )
            devices.append(
                SimDevice(
                    device_id=device_id,
                    kind=kind,
                    district=district.district_id,
                    lat=lat,
                    lon=lon,
                    reporting_interval_s=DEFAULT_REPORTING_INTERVAL_S[kind],
                    zone=zone,
                    circuit=circuit,
                )
            )
    return City(place=place, seed=seed, districts=tuple(districts), devices=tuple(devices))
