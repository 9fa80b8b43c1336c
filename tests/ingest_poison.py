"""The poison corpus of issue 12 as MQTT payloads: readings no store downstream can take.

Shared by ingest's unit tests (validation alone) and its integration test (over MQTT): each
entry is a reading of `kind` with `extra` JSON text written by hand (escapes and numbers a
serialiser would never produce), and the A5 reason ingest must give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from cityops.common.kinds import RejectReason

REQUIRED: dict[str, dict[str, object]] = {
    "streetlight": {"lamp_on": True},
    "manhole": {"cover_open": False},
    "wastebin": {"fill_pct": 40.0},
    "parking": {"occupied": True},
}
GOOD_TS = '"ts":"2026-11-26T08:15:00Z"'


@dataclass(frozen=True)
class Poison:
    """One reading: what it is, its kind, the JSON text added, the reason expected (if any)."""

    name: str
    kind: str
    extra: str
    reason: RejectReason | None = None  # None: a valid reading (a bound's good side)
    seq: str = "7"

    def payload(self, device_id: str) -> bytes:
        """The reading's bytes, from `device_id` (raw surrogates pass through unencoded)."""
        head = orjson.dumps({"device_id": device_id, "kind": self.kind, **REQUIRED[self.kind]})
        text = f'{head.decode()[:-1]},"seq":{self.seq},{self.extra}}}'
        return text.encode("utf-8", "surrogatepass")


TS = RejectReason.TS_OUT_OF_RANGE
CORPUS: tuple[Poison, ...] = (
    Poison("year 1 (+14:00 is year 0 in UTC)", "wastebin", '"ts":"0001-01-01T00:00:00+14:00"', TS),
    Poison("unset sensor clock (1970)", "wastebin", '"ts":"1970-01-01T00:00:00Z"', TS),
    Poison("just before 2000 in UTC", "wastebin", '"ts":"2000-01-01T05:00:00+14:00"', TS),
    Poison(
        "year 9999 (-14:00 is year 10000 in UTC)",
        "wastebin",
        '"ts":"9999-12-31T23:59:59-14:00"',
        RejectReason.CLOCK_SKEW,
    ),
    Poison("NUL in a key", "wastebin", GOOD_TS + ',"\\u0000":1', RejectReason.SCHEMA),
    Poison(
        "NUL in a value", "streetlight", GOOD_TS + ',"fault":"none\\u0000"', RejectReason.SCHEMA
    ),
    Poison(
        "escaped lone surrogate, key", "wastebin", GOOD_TS + ',"\\ud800":1', RejectReason.NOT_JSON
    ),
    Poison(
        "escaped lone surrogate, value",
        "streetlight",
        GOOD_TS + ',"fault":"\\udfff"',
        RejectReason.NOT_JSON,
    ),
    Poison(
        "raw lone surrogate (not UTF-8)", "wastebin", GOOD_TS + ',"\ud800":1', RejectReason.NOT_JSON
    ),
    Poison(
        "1e309 (beyond float64)",
        "wastebin",
        GOOD_TS + ',"temperature_c":1e309',
        RejectReason.SCHEMA,
    ),
    Poison("-1e309", "manhole", GOOD_TS + ',"gas_ppm":-1e309', RejectReason.SCHEMA),
    Poison(
        "a 400-digit integer in a float field",
        "manhole",
        GOOD_TS + ',"gas_ppm":' + "9" * 400,
        RejectReason.SCHEMA,
    ),
    Poison(
        "finite, beyond any quantity",
        "streetlight",
        GOOD_TS + ',"power_w":1e300',
        RejectReason.SCHEMA,
    ),
    Poison("seq beyond int64", "parking", GOOD_TS, RejectReason.SCHEMA, seq=str(2**63)),
    Poison("seq beyond 64 bits", "parking", GOOD_TS, RejectReason.SCHEMA, seq=str(2**70)),
    Poison(
        "deep metadata",
        "parking",
        GOOD_TS + ',"metadata":' + "[" * 500 + "]" * 500,
        RejectReason.NOT_JSON,
    ),
    Poison(
        "metadata (no such field)",
        "parking",
        GOOD_TS + ',"metadata":{"a":{"b":1}}',
        RejectReason.SCHEMA,
    ),
    Poison(
        "huge metadata",
        "parking",
        GOOD_TS + ',"metadata":"' + "x" * 5000 + '"',
        RejectReason.TOO_LARGE,
    ),
)
