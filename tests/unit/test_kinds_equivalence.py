"""The kind files validate exactly as the hand-written models did (tests/legacy_readings.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from cityops.kinds.catalog import KindCatalog, shipped_kinds
from tests.legacy_readings import LEGACY_ADAPTER, LEGACY_MODELS
from tests.unit.test_events import INVALID_FIELDS, VALID_FIELDS, reading


def _catalog() -> KindCatalog:
    return shipped_kinds()


def _strip_field_descriptions(schema: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """The compiled schema documents each kind field (description, unit); the old one did not."""
    for name, prop in schema["properties"].items():
        if name in own:
            prop.pop("description", None)
    return schema


def test_the_shipped_kinds_are_the_four_of_today() -> None:
    assert set(_catalog().names) == set(LEGACY_MODELS)


@pytest.mark.parametrize("kind", sorted(LEGACY_MODELS))
def test_json_schema_is_the_old_one_plus_field_descriptions(kind: str) -> None:
    compiled = _catalog().model(kind).model_json_schema()
    own = set(_catalog().spec(kind).field_names)
    assert all("description" in compiled["properties"][name] for name in own)
    assert _strip_field_descriptions(compiled, own) == LEGACY_MODELS[kind].model_json_schema()


def _message(error: Any) -> str:
    """The error's text; an unknown kind's lists the kinds, alphabetically now (file order)."""
    if error["type"] == "union_tag_invalid":
        expected = sorted(tag.strip(" '") for tag in error["ctx"]["expected_tags"].split(","))
        return f"tag {error['ctx']['tag']!r} not in {expected}"
    return str(error["msg"])


def _outcome(adapter: TypeAdapter[Any], payload: bytes) -> tuple[str, Any]:
    """What validation made of `payload`: the normalised JSON, or the errors (type, place)."""
    try:
        parsed: BaseModel = adapter.validate_json(payload)
    except ValidationError as exc:
        return "rejected", sorted(
            (error["type"], tuple(str(p) for p in error["loc"]), _message(error))
            for error in exc.errors(include_url=False)
        )
    return "accepted", (type(parsed).__name__, adapter.dump_json(parsed, exclude_none=True))


def _same(payload: bytes) -> tuple[str, Any]:
    old = _outcome(LEGACY_ADAPTER, payload)
    new = _outcome(_catalog().reading_adapter, payload)
    assert new == old, payload
    return new


@pytest.mark.parametrize(("kind", "fields"), VALID_FIELDS)
def test_accepted_samples_are_accepted_the_same(kind: str, fields: dict[str, Any]) -> None:
    assert _same(reading(kind, **fields))[0] == "accepted"


@pytest.mark.parametrize(("kind", "fields", "field"), INVALID_FIELDS)
def test_rejected_samples_are_rejected_the_same(
    kind: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    assert _same(reading(kind, **fields))[0] == "rejected"


_KIND_FIELDS = {
    "streetlight": ("lamp_on", "dim_pct", "power_w", "voltage_v", "fault"),
    "manhole": ("cover_open", "tilt_deg", "water_level_pct", "gas_ppm"),
    "wastebin": ("fill_pct", "temperature_c", "lid_open", "tilt_deg"),
    "parking": ("occupied",),
}
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-300, max_value=2_000_000),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7),
    st.sampled_from(["none", "lamp_failure", "driver_fault", "power_loss", "broken", "", "5"]),
    st.lists(st.integers(), max_size=2),
)
_COMMON = {
    "device_id": st.sampled_from(["wb-0042", "ab", "bad/id", "A" * 64]),
    "ts": st.sampled_from(
        ["2026-11-26T08:15:00Z", "2026-11-26T08:15:00", "1999-12-31T23:59:59Z", "2100-01-01T00:00Z"]
    ),
    "seq": st.one_of(st.integers(min_value=-2, max_value=2**64 - 1), st.sampled_from(["5", 1.5])),
    "battery_pct": _ANY_VALUE,
    "rssi_dbm": _ANY_VALUE,
}


# Today's ranges, written out independently of the kind files: values near and across each edge.
_BOUNDS = {
    "dim_pct": (0, 100),
    "power_w": (0, 1_000_000),
    "voltage_v": (0, 1_000_000),
    "tilt_deg": (0, 180),
    "water_level_pct": (0, 100),
    "gas_ppm": (0, 1_000_000),
    "fill_pct": (0, 100),
    "temperature_c": (-60, 200),
}
_BOOLS = ("lamp_on", "cover_open", "lid_open", "occupied")


def _near_valid(name: str) -> st.SearchStrategy[Any]:
    if name in _BOUNDS:
        low, high = _BOUNDS[name]
        return st.one_of(
            st.floats(min_value=low - 1, max_value=high + 1, allow_nan=False),
            st.integers(min_value=low - 1, max_value=high + 1),
            st.sampled_from([low, high, float(low), float(high), low - 1e-9, high + 1e-9]),
        )
    if name in _BOOLS:
        return st.one_of(st.booleans(), st.booleans(), st.sampled_from([0, 1, "true", None]))
    if name == "fault":
        return st.sampled_from(["none", "lamp_failure", "driver_fault", "power_loss", "x", None])
    return _ANY_VALUE


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A reading-like JSON object: any kind (or none), any subset of fields, any values."""
    kind = draw(st.sampled_from([*_KIND_FIELDS, "noise", None]))
    body: dict[str, Any] = {} if kind is None else {"kind": kind}
    names = [*_COMMON, *_KIND_FIELDS.get(kind or "", ()), "fill_pct", "colour"]
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))):
        body[name] = draw(_COMMON.get(name, _ANY_VALUE))
    return json.dumps(body).encode()


@st.composite
def near_valid_payloads(draw: st.DrawFn) -> bytes:
    """A complete reading of a shipped kind whose fields sit near and across their limits."""
    kind = draw(st.sampled_from(sorted(_KIND_FIELDS)))
    body: dict[str, Any] = {
        "device_id": "wb-0042",
        "kind": kind,
        "ts": "2026-11-26T08:15:00Z",
        "seq": draw(st.integers(min_value=0, max_value=2**63 - 1)),
    }
    fields = _KIND_FIELDS[kind]
    body[fields[0]] = draw(_near_valid(fields[0]))  # the required one (first in each kind)
    for name in draw(st.lists(st.sampled_from(fields), unique=True)):
        body[name] = draw(_near_valid(name))
    if draw(st.booleans()):
        body["battery_pct"] = draw(st.floats(min_value=-1, max_value=101, allow_nan=False))
    return json.dumps(body).encode()


@settings(max_examples=1500, deadline=None)
@given(payloads())
def test_any_payload_gets_the_same_outcome(payload: bytes) -> None:
    _same(payload)


@settings(max_examples=1500, deadline=None)
@given(near_valid_payloads())
def test_readings_near_their_limits_get_the_same_outcome(payload: bytes) -> None:
    _same(payload)
