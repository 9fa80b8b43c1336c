"""Field types of request input: text and JSON values that every store downstream accepts.

PostgreSQL refuses NUL in `text` and `jsonb`, UTF-8 has no lone surrogates (JSON's `\\ud800`
decodes to one in Python), orjson and `bigint` stop at 64-bit integers, and JSON has no NaN.
Input is checked against these once, here, so a route never meets them as a 500 from a
driver or an encoder. Pure functions: no I/O.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from cityops.common.topics import DEVICE_ID_PATTERN

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 16
# Query instants: wide enough for any history, far from datetime's year 1 / 9999 edges, so
# window arithmetic (defaults of 24 h, buckets, the UTC conversion itself) cannot overflow.
INSTANT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
INSTANT_MAX = datetime(9000, 1, 1, tzinfo=UTC)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored (NUL, lone surrogate), or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def check_text(text: str) -> str:
    """`text` if it can be stored; ValueError saying why not."""
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def json_value_problem(value: Any) -> str | None:
    """Why a parsed JSON value cannot be stored and served back exactly (with where), or None."""
    return _value_problem(value, path="", depth=0)


def _value_problem(value: Any, *, path: str, depth: int) -> str | None:
    reason: str | None = None
    children: list[tuple[str, Any]] = []
    if depth > MAX_METADATA_DEPTH:
        reason = f"nested deeper than {MAX_METADATA_DEPTH} levels"
    elif value is None or isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            reason = "integer outside the signed 64-bit range"
    elif isinstance(value, float):
        if not math.isfinite(value):
            reason = "numbers must be finite (no NaN or Infinity)"
    elif isinstance(value, str):
        reason = text_problem(value)
    elif isinstance(value, list):
        children = [(str(index), item) for index, item in enumerate(value)]
    elif isinstance(value, dict):
        for key in value:
            reason = text_problem(key) if isinstance(key, str) else "keys must be strings"
            if reason is not None:
                return f"key {path}{'.' if path else ''}{key!r}: {reason}"
        children = [(key, item) for key, item in value.items()]
    else:
        reason = f"{type(value).__name__} is not a JSON value"
    if reason is not None:
        return f"{path}: {reason}" if path else reason
    for where, item in children:
        problem = _value_problem(item, path=f"{path}.{where}" if path else where, depth=depth + 1)
        if problem is not None:
            return problem
    return None


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Registry metadata that PostgreSQL and orjson keep exactly, within the size limit."""
    problem = json_value_problem(value)
    if problem is not None:
        raise ValueError(problem)
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes of JSON")
    return value


def loads_exact(text: str | bytes) -> Any:
    """Parse JSON keeping integers exact (orjson turns those beyond 64 bits into floats).

    ValueError for text that is not JSON (or nested too deeply to parse); `NaN` and
    `Infinity` parse (as Python's json does) and are refused by `check_metadata`.
    """
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("not JSON: nested too deeply") from exc


def check_instant(value: datetime) -> datetime:
    """An aware datetime in UTC between INSTANT_MIN and INSTANT_MAX."""
    try:
        value = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("out of range") from exc
    if not INSTANT_MIN <= value < INSTANT_MAX:
        raise ValueError(
            f"must be from {INSTANT_MIN.date().isoformat()} to before"
            f" {INSTANT_MAX.date().isoformat()}"
        )
    return value


SafeText = Annotated[str, AfterValidator(check_text)]
Metadata = Annotated[dict[str, Any], AfterValidator(check_metadata)]
Instant = Annotated[AwareDatetime, AfterValidator(check_instant)]


# Field types shared by the domains' models.
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN, min_length=3, max_length=64)]
District = Annotated[SafeText, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
Zone = Annotated[SafeText, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]
ReportingInterval = Annotated[int, Field(ge=1, le=604_800)]


class Input(BaseModel):
    """Base of every request body: unknown fields and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
