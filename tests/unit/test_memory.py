"""Memory a burst no longer needs goes back to the system."""

from __future__ import annotations

import gc
from pathlib import Path

from cityops.common.memory import _malloc_trim, release_memory


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_release_memory_returns_a_freed_burst() -> None:
    assert _malloc_trim() is not None  # glibc on every machine this runs on
    gc.disable()  # the burst's cycles wait for release_memory, as in a busy service
    try:
        before = _rss_kib()
        burst: list[object] = []
        for n in range(300_000):
            node: list[object] = [n, b"x" * 100]
            node.append(node)  # a cycle: only the collector frees it
            burst.append(node)
        del burst, node
        grown = _rss_kib()
        release_memory()
        after = _rss_kib()
    finally:
        gc.enable()
    assert grown - before > 30_000  # the burst really took memory
    assert after - before < (grown - before) / 2, (before, grown, after)
