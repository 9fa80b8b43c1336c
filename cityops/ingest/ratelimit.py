"""Per-device token buckets, timed by the sensor's own clock.

A bucket refills at `rate_per_s` tokens per second of *measurement time* (the reading's `ts`),
up to `burst`. Timing by sensor time rather than arrival time is deliberate: after an ingest or
network outage the broker hands over an hour of queued readings in a second, and those readings
are legitimate because their timestamps are spread over the hour. A device that floods sends
timestamps closer together than its budget allows and is refused; it cannot buy tokens with
future timestamps because clock-skew validation (which runs first) caps `ts` at now + skew, and
timestamps that go backwards refill nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last_at: float


class TokenBuckets:
    """A bounded map of device id -> token bucket. Pure: time is passed in."""

    def __init__(self, *, rate_per_s: float, burst: float, max_keys: int = 1_000_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self._rate = rate_per_s
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, at: float) -> bool:
        """Take one token from `key`'s bucket at time `at` (seconds); False when it is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # Evict the oldest-inserted bucket: a forgotten device merely starts full again.
                del self._buckets[next(iter(self._buckets))]
            self._buckets[key] = _Bucket(tokens=self._burst - 1, last_at=at)
            return True
        elapsed = at - bucket.last_at
        if elapsed > 0:
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.last_at = at
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False
