"""The API bench's load generator keeps its own garbage collector quiet while it measures."""

from __future__ import annotations

import gc

from bench.api import _percentile, _quiet_collector


def test_quiet_collector_freezes_the_heap_reports_full_collections_and_restores() -> None:
    assert gc.get_freeze_count() == 0
    with _quiet_collector() as pauses:
        assert gc.get_freeze_count() > 0  # what was alive is out of the collector's reach
        gc.collect(1)  # not a full collection: not reported
        gc.collect()
        assert len(pauses) == 1
        assert pauses[0] >= 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert len(pauses) == 1  # the callback is gone


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert _percentile(values, 50) == 50.0
    assert _percentile(values, 99) == 99.0
    assert _percentile([], 99) != _percentile([], 99)  # nan
