"""Pure parsing of query parameters: cursors, bounding boxes, bucket widths, time windows."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson

from cityops.api.http.fields import INT64_MAX, INT64_MIN, text_problem

MAX_BUCKETS = 10_000
MAX_WINDOW = timedelta(days=366)
DEFAULT_WINDOW = timedelta(hours=24)
_BUCKET_RE = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_MAX_CURSOR = 512
_MAX_CURSOR_KEY = 64  # the longest sort key a list returns (a device id)


class ParamError(ValueError):
    """A query parameter that cannot be used; the message names the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def encode_cursor(after: str | int) -> str:
    """An opaque cursor that resumes a list after `after` (a sort key)."""
    return base64.urlsafe_b64encode(orjson.dumps({"a": after})).decode().rstrip("=")


def decode_cursor(cursor: str, *, kind: type[str] | type[int]) -> str | int:
    """The sort key in a cursor made by `encode_cursor`; ParamError if it was not."""
    if len(cursor) > _MAX_CURSOR:
        raise ParamError("cursor", "too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = orjson.loads(raw)["a"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise ParamError("cursor", "not a cursor this API returned") from exc
    # A forged cursor may hold anything JSON can: only keys a list could have returned pass.
    if kind is int:
        valid = not isinstance(after, bool) and isinstance(after, int)
        valid = valid and INT64_MIN <= after <= INT64_MAX
    else:
        valid = isinstance(after, str) and len(after) <= _MAX_CURSOR_KEY
        valid = valid and text_problem(after) is None
    if not valid:
        raise ParamError("cursor", "not a cursor this API returned")
    return after  # type: ignore[no-any-return]  # checked just above


@dataclass(frozen=True, slots=True)
class BBox:
    """A lon/lat rectangle (WGS84 degrees)."""

    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float


def parse_bbox(text: str) -> BBox:
    """`min_lon,min_lat,max_lon,max_lat` in degrees."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ParamError("bbox", "expected min_lon,min_lat,max_lon,max_lat")
    try:
        min_lon, min_lat, max_lon, max_lat = (float(part) for part in parts)
    except ValueError as exc:
        raise ParamError("bbox", "every corner coordinate must be a number") from exc
    for name, value, limit in (
        ("min_lon", min_lon, 180),
        ("max_lon", max_lon, 180),
        ("min_lat", min_lat, 90),
        ("max_lat", max_lat, 90),
    ):
        if not -limit <= value <= limit:
            raise ParamError("bbox", f"{name} must be within ±{limit}")
    if min_lon > max_lon or min_lat > max_lat:
        raise ParamError("bbox", "min corner must be south-west of max corner")
    return BBox(min_lon, min_lat, max_lon, max_lat)


def parse_bucket(text: str) -> timedelta:
    """A bucket width such as `30s`, `15m`, `1h`, `1d`."""
    match = _BUCKET_RE.fullmatch(text)
    if match is None:
        raise ParamError("bucket", "expected a width such as 30s, 15m, 1h or 1d")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > 366 * 86_400:
        raise ParamError("bucket", "at most 366 days")
    return timedelta(seconds=seconds)


def resolve_window(
    *, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """The [start, end) of a readings query: defaults to the last 24 h, at most 366 days."""
    if start is not None and start.tzinfo is None:
        raise ParamError("from", "needs a UTC offset, e.g. 2026-11-26T08:00:00Z")
    if end is not None and end.tzinfo is None:
        raise ParamError("to", "needs a UTC offset, e.g. 2026-11-26T08:00:00Z")
    end = end or now
    start = start or end - DEFAULT_WINDOW
    if start >= end:
        raise ParamError("from", "must be before `to`")
    if end - start > MAX_WINDOW:
        raise ParamError("from", "the window is longer than 366 days")
    return start, end


def check_bucket_count(*, start: datetime, end: datetime, bucket: timedelta) -> None:
    """Refuse a query that would return more than MAX_BUCKETS buckets."""
    if (end - start) / bucket > MAX_BUCKETS:
        raise ParamError("bucket", f"too narrow for the window: more than {MAX_BUCKETS} buckets")
