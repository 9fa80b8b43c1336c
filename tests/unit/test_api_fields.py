"""Input field types: text and JSON values every store downstream accepts, exactly."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from cityops.api.http.fields import (
    INT64_MAX,
    INT64_MIN,
    MAX_METADATA_DEPTH,
    Instant,
    Metadata,
    SafeText,
    json_value_problem,
    loads_exact,
)
from cityops.api.http.params import ParamError, decode_cursor, encode_cursor

_TEXT = TypeAdapter(SafeText)
_METADATA = TypeAdapter(Metadata)
_INSTANT = TypeAdapter(Instant)


@pytest.mark.parametrize("text", ["a\x00b", "\ud800", "x\udfff"])
def test_text_refuses_nul_and_lone_surrogates(text: str) -> None:
    with pytest.raises(ValidationError):
        _TEXT.validate_python(text)


def test_text_keeps_any_other_unicode() -> None:
    assert _TEXT.validate_python("Straße 🚲 \t") == "Straße 🚲 \t"


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"n": INT64_MAX + 1}, "n: integer outside"),
        ({"n": INT64_MIN - 1}, "n: integer outside"),
        ({"a": [1, {"b": 10**30}]}, "a.1.b: integer outside"),
        ({"x": float("nan")}, "x: numbers must be finite"),
        ({"x": float("inf")}, "x: numbers must be finite"),
        ({"x": "a\x00"}, "x: contains a NUL"),
        ({"\ud800": 1}, "key '\\ud800': contains a lone surrogate"),
        ({"x": {1, 2}}, "x: set is not a JSON value"),
    ],
)
def test_metadata_problems_name_where(value: dict[str, Any], where: str) -> None:
    problem = json_value_problem(value)
    assert problem is not None
    assert problem.startswith(where)
    with pytest.raises(ValidationError):
        _METADATA.validate_python(value)


def test_metadata_keeps_64_bit_integers_and_floats_exactly() -> None:
    value = {"lo": INT64_MIN, "hi": INT64_MAX, "f": 1.5e308, "nested": [{"ok": True}, None]}
    assert _METADATA.validate_python(value) == value


def test_metadata_depth_and_size_are_bounded() -> None:
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested deeper"):
        _METADATA.validate_python({"d": deep})
    with pytest.raises(ValidationError, match="larger than"):
        _METADATA.validate_python({"s": "x" * 9000})


def test_loads_exact_keeps_big_integers_exact() -> None:
    assert loads_exact('{"n": 18446744073709551616}') == {"n": 18446744073709551616}
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_exact("[" * 100_000)
    with pytest.raises(json.JSONDecodeError):
        loads_exact("{broken")


@pytest.mark.parametrize(
    "text",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1969-12-31T23:59:59Z"],
)
def test_instants_near_the_ends_of_the_calendar_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        _INSTANT.validate_python(text)


def test_instants_are_utc() -> None:
    local = datetime(2026, 12, 4, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    assert _INSTANT.validate_python(local) == datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    assert _INSTANT.validate_python(local).tzinfo is UTC


@pytest.mark.parametrize(
    ("after", "kind"),
    [(2**63, int), (-(2**63) - 1, int), ("wb\x00", str), ("x" * 65, str), (1.5, int)],
)
def test_forged_cursors_are_refused(after: Any, kind: type[str] | type[int]) -> None:
    forged = base64.urlsafe_b64encode(json.dumps({"a": after}).encode()).decode()
    with pytest.raises(ParamError, match="not a cursor"):
        decode_cursor(forged, kind=kind)


def test_cursors_round_trip() -> None:
    assert decode_cursor(encode_cursor(INT64_MAX), kind=int) == INT64_MAX
    assert decode_cursor(encode_cursor("wb-0042"), kind=str) == "wb-0042"
