"""The deadline heap: due keys in order, moves, cancels, compaction."""

from __future__ import annotations

from cityops.rules.timers import DeadlineHeap


def test_pops_due_keys_in_deadline_order() -> None:
    heap = DeadlineHeap()
    heap.schedule(("offline", "b", ""), 20.0)
    heap.schedule(("offline", "a", ""), 10.0)
    heap.schedule(("offline", "c", ""), 30.0)
    assert heap.next_deadline() == 10.0
    assert heap.pop_due(25.0) == [("offline", "a", ""), ("offline", "b", "")]
    assert len(heap) == 1
    assert heap.pop_due(25.0) == []
    assert heap.pop_due(30.0) == [("offline", "c", "")]


def test_moving_a_deadline_later_defers_it_without_duplicates() -> None:
    heap = DeadlineHeap()
    key = ("offline", "a", "")
    heap.schedule(key, 10.0)
    for later in range(11, 200):
        heap.schedule(key, float(later))  # a reading per second pushes the deadline
    assert heap.pop_due(100.0) == []
    assert heap.deadline(key) == 199.0
    assert heap.pop_due(199.0) == [key]
    assert heap.pop_due(1000.0) == []


def test_moving_a_deadline_earlier_fires_once_at_the_earlier_time() -> None:
    heap = DeadlineHeap()
    key = ("for", "a", "bin_tipped")
    heap.schedule(key, 50.0)
    heap.schedule(key, 5.0)
    assert heap.pop_due(5.0) == [key]
    assert heap.pop_due(60.0) == []


def test_cancelled_keys_never_fire_and_can_be_rescheduled() -> None:
    heap = DeadlineHeap()
    key = ("escalate", "a", "bin_full")
    heap.schedule(key, 5.0)
    heap.cancel(key)
    assert key not in heap
    assert heap.pop_due(10.0) == []
    heap.schedule(key, 12.0)
    assert heap.pop_due(12.0) == [key]


def test_stale_entries_are_compacted_away() -> None:
    heap = DeadlineHeap()
    for i in range(5000):
        key = ("offline", f"d{i}", "")
        heap.schedule(key, 1000.0)
        heap.schedule(key, 10.0)  # an earlier entry each: the 1000.0 ones go stale
        heap.cancel(key)
    heap.schedule(("offline", "live", ""), 20.0)
    assert len(heap._heap) < 2 * len(heap) + 1100
    assert heap.pop_due(2000.0) == [("offline", "live", "")]


def test_pop_due_respects_limit() -> None:
    heap = DeadlineHeap()
    for i in range(10):
        heap.schedule(("offline", f"d{i}", ""), float(i))
    assert len(heap.pop_due(100.0, limit=4)) == 4
    assert len(heap.pop_due(100.0)) == 6
