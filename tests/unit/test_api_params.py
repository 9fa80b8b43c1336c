"""Query parameter parsing: cursors, bbox, bucket widths, time windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cityops.api.http.params import (
    BBox,
    ParamError,
    check_bucket_count,
    decode_cursor,
    encode_cursor,
    parse_bbox,
    parse_bucket,
    resolve_window,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_cursor_round_trip() -> None:
    assert decode_cursor(encode_cursor("wb-0042"), kind=str) == "wb-0042"
    assert decode_cursor(encode_cursor(1234), kind=int) == 1234


@pytest.mark.parametrize("cursor", ["", "!!!", "e30", encode_cursor("x"), "a" * 600])
def test_foreign_cursors_are_refused_for_int_keys(cursor: str) -> None:
    with pytest.raises(ParamError) as info:
        decode_cursor(cursor, kind=int)
    assert info.value.param == "cursor"


def test_int_cursor_is_not_a_string_cursor() -> None:
    with pytest.raises(ParamError):
        decode_cursor(encode_cursor(5), kind=str)


def test_bbox() -> None:
    assert parse_bbox("13.3,52.4,13.5,52.6") == BBox(13.3, 52.4, 13.5, 52.6)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1,2,3", "expected"),
        ("a,b,c,d", "number"),
        ("13.5,52.4,13.3,52.6", "south-west"),
        ("0,-91,1,1", "min_lat"),
        ("-181,0,1,1", "min_lon"),
        ("nan,0,1,1", "within"),
    ],
)
def test_bad_bbox_says_why(text: str, says: str) -> None:
    with pytest.raises(ParamError, match=says):
        parse_bbox(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 604_800)]
)
def test_bucket_widths(text: str, seconds: int) -> None:
    assert parse_bucket(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "1w", "1.5h", "-1h", "1000d", "h"])
def test_bad_buckets(text: str) -> None:
    with pytest.raises(ParamError):
        parse_bucket(text)


def test_window_defaults_to_the_last_day() -> None:
    assert resolve_window(start=None, end=None, now=NOW) == (NOW - timedelta(days=1), NOW)


def test_window_must_be_ordered_bounded_and_aware() -> None:
    with pytest.raises(ParamError, match="before"):
        resolve_window(start=NOW, end=NOW, now=NOW)
    with pytest.raises(ParamError, match="366"):
        resolve_window(start=NOW - timedelta(days=400), end=NOW, now=NOW)
    with pytest.raises(ParamError, match="offset"):
        resolve_window(start=datetime(2026, 1, 1), end=None, now=NOW)


def test_bucket_count_is_bounded() -> None:
    check_bucket_count(start=NOW - timedelta(days=1), end=NOW, bucket=timedelta(seconds=10))
    with pytest.raises(ParamError, match="buckets"):
        check_bucket_count(start=NOW - timedelta(days=2), end=NOW, bucket=timedelta(seconds=10))
