"""Start-up heap freeze: long-lived objects leave the collector's generations, garbage does not."""

from __future__ import annotations

import gc
import weakref

from cityops.api.main import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freeze_collects_garbage_first_and_hides_live_objects_from_full_collections() -> None:
    live = [_Node()]  # stands for the app, routes and models built at start-up
    cycle_a, cycle_b = _Node(), _Node()
    cycle_a.other, cycle_b.other = cycle_b, cycle_a  # garbage only a collection can free
    garbage = weakref.ref(cycle_a)
    del cycle_a, cycle_b
    try:
        frozen = freeze_startup_heap()
        assert garbage() is None  # collected, not frozen forever
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is live for obj in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
    assert any(obj is live for obj in gc.get_objects(generation=2))
