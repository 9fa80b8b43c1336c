"""A deadline heap keyed by (timer kind, device id, rule id): offline, duration and SLA timers.

Pure: the caller supplies `now`. Moving a deadline later (every reading pushes a device's
offline deadline) only updates a dict; the heap entry is re-pushed when it surfaces, so the
hot path allocates no heap entries. Cancelled and superseded entries are dropped lazily and
the heap is compacted when stale entries outnumber live ones.
"""

from __future__ import annotations

import heapq
import itertools

TimerKey = tuple[str, str, str]


class DeadlineHeap:
    """Deadlines by key; `pop_due(now)` returns the keys whose deadline has passed."""

    def __init__(self) -> None:
        self._wanted: dict[TimerKey, float] = {}
        self._queued: dict[TimerKey, float] = {}  # the earliest heap entry of each key
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._wanted)

    def __contains__(self, key: object) -> bool:
        return key in self._wanted

    def deadline(self, key: TimerKey) -> float | None:
        """The key's deadline, if it has one."""
        return self._wanted.get(key)

    def schedule(self, key: TimerKey, deadline: float) -> None:
        """Set (or move) the key's deadline."""
        self._wanted[key] = deadline
        queued = self._queued.get(key)
        if queued is None or deadline < queued:
            self._push(key, deadline)

    def cancel(self, key: TimerKey) -> None:
        """Forget the key's deadline (its heap entry is dropped when it surfaces)."""
        self._wanted.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest heap entry (it may turn out stale; waking early is harmless)."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, *, limit: int = 100_000) -> list[TimerKey]:
        """Remove and return up to `limit` keys whose deadline is at or before `now`."""
        due: list[TimerKey] = []
        while self._heap and self._heap[0][0] <= now and len(due) < limit:
            entry_deadline, _, key = heapq.heappop(self._heap)
            if self._queued.get(key) != entry_deadline:
                continue  # superseded by an earlier entry that already surfaced
            del self._queued[key]
            wanted = self._wanted.get(key)
            if wanted is None:
                continue  # cancelled
            if wanted > now:
                self._push(key, wanted)  # moved later meanwhile
                continue
            del self._wanted[key]
            due.append(key)
        return due

    def _push(self, key: TimerKey, deadline: float) -> None:
        self._queued[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._counter), key))
        if len(self._heap) > 2 * len(self._wanted) + 1024:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(d, next(self._counter), k) for k, d in self._wanted.items()]
        heapq.heapify(self._heap)
        self._queued = dict(self._wanted)
