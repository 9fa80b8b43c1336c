"""Token buckets timed by sensor time: bursts are capped, spread-out backlogs pass."""

from __future__ import annotations

import pytest

from cityops.ingest.ratelimit import TokenBuckets


def test_burst_then_refusal_then_refill() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=3)
    assert [buckets.allow("wb-1", 100.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("wb-1", 100.5) is False  # half a token is not enough
    assert buckets.allow("wb-1", 101.0) is True


def test_devices_have_separate_budgets() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=1)
    assert buckets.allow("a-1", 0.0)
    assert not buckets.allow("a-1", 0.0)
    assert buckets.allow("b-2", 0.0)


def test_a_queued_backlog_spread_over_sensor_time_passes() -> None:
    # An hour of readings every 10 s, handed over in one go after an outage.
    buckets = TokenBuckets(rate_per_s=1.0, burst=5)
    assert all(buckets.allow("pk-1", 1000.0 + 10 * n) for n in range(360))


def test_timestamps_going_backwards_refill_nothing() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=2)
    assert buckets.allow("mh-1", 500.0)
    assert buckets.allow("mh-1", 100.0)
    assert not buckets.allow("mh-1", 50.0)
    assert not buckets.allow("mh-1", 500.5)
    assert buckets.allow("mh-1", 501.0)


def test_tokens_never_exceed_the_burst() -> None:
    buckets = TokenBuckets(rate_per_s=10.0, burst=2)
    buckets.allow("sl-1", 0.0)
    results = [buckets.allow("sl-1", 10_000.0) for _ in range(3)]
    assert results == [True, True, False]


def test_memory_is_bounded() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, max_keys=100)
    for n in range(1000):
        buckets.allow(f"dev-{n}", 0.0)
    assert len(buckets) == 100


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.5), (-1.0, 5.0)])
def test_nonsense_settings_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBuckets(rate_per_s=rate, burst=burst)
