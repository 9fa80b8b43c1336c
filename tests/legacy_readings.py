"""The reading models as hand-written Python before kinds became files (issue 14).

Kept only as the reference the compiled kinds are tested against (tests/unit/
test_kinds_equivalence.py): validation must be exactly what these classes did.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from cityops.common.events import MAX_QUANTITY, ReadingBase

Percent = Annotated[float, Field(ge=0, le=100)]
NonNegative = Annotated[float, Field(ge=0, le=MAX_QUANTITY)]
TiltDeg = Annotated[float, Field(ge=0, le=180)]


class StreetlightReading(ReadingBase):
    """A street light's reading."""

    kind: Literal["streetlight"]
    lamp_on: bool
    dim_pct: Percent | None = None
    power_w: NonNegative | None = None
    voltage_v: NonNegative | None = None
    fault: Literal["none", "lamp_failure", "driver_fault", "power_loss"] | None = None


class ManholeReading(ReadingBase):
    """A manhole cover's reading."""

    kind: Literal["manhole"]
    cover_open: bool
    tilt_deg: TiltDeg | None = None
    water_level_pct: Percent | None = None
    gas_ppm: NonNegative | None = None


class WastebinReading(ReadingBase):
    """A waste bin's reading."""

    kind: Literal["wastebin"]
    fill_pct: Percent
    temperature_c: Annotated[float, Field(ge=-60, le=200)] | None = None
    lid_open: bool | None = None
    tilt_deg: TiltDeg | None = None


class ParkingReading(ReadingBase):
    """A parking spot's reading."""

    kind: Literal["parking"]
    occupied: bool


LEGACY_MODELS: dict[str, type[ReadingBase]] = {
    "streetlight": StreetlightReading,
    "manhole": ManholeReading,
    "wastebin": WastebinReading,
    "parking": ParkingReading,
}
LegacyReading = Annotated[
    StreetlightReading | ManholeReading | WastebinReading | ParkingReading,
    Field(discriminator="kind"),
]
LEGACY_ADAPTER: TypeAdapter[LegacyReading] = TypeAdapter(LegacyReading)
