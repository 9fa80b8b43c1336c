"""Rate-limited repeats: an outage logs one line per interval per kind, with a count."""

from __future__ import annotations

import logging

from cityops.common.logs import JsonFormatter, RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_thirty_errors_a_second_become_one_line_per_interval_with_the_count() -> None:
    clock = Clock()
    repeats = RepeatFilter(10.0, clock=clock)
    passed = []
    for tick in range(300):  # 30 a second for 10 s, as aiokafka logs while Kafka is down
        clock.now = 1000.0 + tick / 30
        line = record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "refused")
        if repeats.filter(line):
            passed.append(line)
    assert len(passed) == 1
    clock.now = 1010.5
    summary = record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "refused")
    assert repeats.filter(summary)
    assert summary.getMessage() == (
        "Unable connect to node with id 1: refused [299 more like this in the last 10 s]"
    )
    rendered = JsonFormatter(service="api", instance_id="t").format(summary)
    assert '"repeats_suppressed":299' in rendered


def test_kinds_are_counted_apart_and_info_is_never_filtered() -> None:
    clock = Clock()
    repeats = RepeatFilter(10.0, clock=clock)
    assert repeats.filter(
        record("cityops.api.projector.consumer", "read-model write failed: %s", "x")
    )
    assert repeats.filter(record("cityops.rules.consumer", "read-model write failed: %s", "x"))
    assert repeats.filter(
        record(
            "cityops.api.projector.consumer",
            "read-model write failed: %s",
            "x",
            level=logging.WARNING,
        )
    )
    assert not repeats.filter(
        record("cityops.api.projector.consumer", "read-model write failed: %s", "y")
    )
    for _ in range(5):
        assert repeats.filter(record("cityops.api", "projected batch", level=logging.INFO))


def test_an_interval_of_zero_turns_it_off() -> None:
    repeats = RepeatFilter(0.0, clock=Clock())
    assert all(repeats.filter(record("x", "same")) for _ in range(10))
