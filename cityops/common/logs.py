"""Structured logging: JSON lines when not on a terminal, readable text when on one.

Warnings and errors that repeat (an outage: every retry of every client logs) are rate-limited
by `RepeatFilter` on the handler, so they pass for every logger, aiokafka's included.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed in `extra` and is context.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the `extra` context."""

    def __init__(self, *, service: str, instance_id: str) -> None:
        super().__init__()
        self._service = service
        self._instance_id = instance_id

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "service": self._service,
            "instance": self._instance_id,
        }
        entry.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class RepeatFilter(logging.Filter):
    """One warning or error per (logger, level, message template) per interval.

    The first record of a kind passes; the ones that follow within `interval_s` are counted and
    dropped; the first one after the interval passes with the count (`repeats_suppressed`, and
    in its message). During an outage a service logs one line per interval per kind of failure,
    not one per retry. Records below WARNING are never filtered.
    """

    _MAX_KINDS = 1024

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        # (logger, level, template) -> [start of the current interval, records suppressed]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the interval; a passing record carries the count."""
        if record.levelno < logging.WARNING or self._interval_s <= 0:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval_s:
            seen[1] += 1
            return False
        if seen is None and len(self._seen) >= self._MAX_KINDS:
            self._seen.clear()  # a flood of distinct templates: start counting afresh
        self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            suppressed = int(seen[1])
            record.msg = (
                f"{record.getMessage()} [{suppressed} more like this in the last "
                f"{now - seen[0]:.0f} s]"
            )
            record.args = None
            record.repeats_suppressed = suppressed
        return True


def configure_logging(
    *,
    service: str,
    instance_id: str,
    level: str = "INFO",
    fmt: str = "auto",
    repeat_interval_s: float = 10.0,
) -> None:
    """Configure the root logger once, from a service's main().

    Repeated warnings and errors are rate-limited to one line per `repeat_interval_s` per kind
    (0 turns that off).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter(repeat_interval_s))
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    if use_json:
        handler.setFormatter(JsonFormatter(service=service, instance_id=instance_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every retry at ERROR; keep its noise at WARNING unless debugging.
    if level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
