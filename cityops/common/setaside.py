"""Records a consumer cannot process: told apart from outages, and set aside as dead letters.

A consumer loop never ends on data and never skips a record silently. When a write fails, the
error says whether the *record* is at fault (PostgreSQL refused a value: SQLSTATE class 22 data
exception, 23 integrity, 54 program limit, or Python could not convert it) or a *dependency*
is (a lost connection, a server shutting down, a timeout: everything else). A record at fault
is produced to the dead-letter topic with where it came from and why (`SetAside`), counted, and
the consumer moves on; an outage is retried, forever, with capped backoff.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord
from prometheus_client import Counter

log = logging.getLogger(__name__)

# A5 reasons a downstream consumer gives (ingest's reasons are refusals at the edge).
UNDECODABLE: Final = "undecodable"  # not a record of the topic's contract
UNPROCESSABLE: Final = "unprocessable"  # decoded, but the store refused a value
REASONS: Final = (UNDECODABLE, UNPROCESSABLE)

# SQLSTATE classes that blame the statement's data, not the server or the connection.
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})
# Python-side conversion errors (a value the driver or our code cannot represent).
_DATA_EXCEPTIONS = (ValueError, TypeError, OverflowError, KeyError, UnicodeError)
# A dead letter keeps this much of the original value (telemetry is at most 4 KiB), plus its
# size, so a huge record produced straight into Kafka cannot fill the dead-letter topic.
RAW_PREFIX_BYTES: Final = 8192
_DETAIL_MAX_CHARS = 500


def is_data_error(exc: BaseException) -> bool:
    """True when `exc` blames the data written, False when it blames a dependency."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _DATA_SQLSTATE_CLASSES
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError):
        # asyncpg's client-side "invalid input" error is an InterfaceError *and* a ValueError
        return isinstance(exc, ValueError) and not isinstance(exc, OSError)
    return isinstance(exc, _DATA_EXCEPTIONS)


def describe(exc: BaseException) -> str:
    """A bounded one-line reason for a dead-letter header."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:_DETAIL_MAX_CHARS]


def deadletter_headers(
    record: ConsumerRecord[bytes, bytes], *, consumer: str, reason: str, detail: str
) -> list[tuple[str, bytes]]:
    """Headers of a downstream dead letter: why, who set it aside, and where it was."""
    value = record.value if record.value is not None else b""
    size = len(value)
    headers = [
        ("reason", reason.encode()),
        ("detail", detail[:_DETAIL_MAX_CHARS].encode("utf-8", "replace")),
        ("consumer", consumer.encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
        ("original_size", str(size).encode()),
        ("set_aside_at", datetime.now(UTC).isoformat().encode()),
    ]
    if size > RAW_PREFIX_BYTES:
        # like ingest's: a value cut to its prefix is identified by the hash of the whole
        headers.append(("sha256", hashlib.sha256(value).hexdigest().encode()))
    return headers


@dataclass(frozen=True, slots=True)
class SetAside:
    """Produce records a consumer cannot process to the dead-letter topic, and count them.

    Raises KafkaError when the dead-letter topic cannot take the record: the caller treats that
    as an outage and retries (the record stays uncommitted, so it is never lost).
    """

    producer: AIOKafkaProducer
    topic: str
    consumer: str
    counter: Counter  # labelled by reason

    def __post_init__(self) -> None:
        for reason in REASONS:
            self.counter.labels(reason)  # exported at 0 from start-up, so alerts see the first

    async def __call__(
        self, record: ConsumerRecord[bytes, bytes], *, reason: str, detail: str
    ) -> None:
        """Dead-letter `record` (a bounded prefix of its value) with its reason."""
        value = record.value if record.value is not None else b""
        headers: Sequence[tuple[str, bytes]] = deadletter_headers(
            record, consumer=self.consumer, reason=reason, detail=detail
        )
        await self.producer.send_and_wait(
            self.topic, key=record.key, value=value[:RAW_PREFIX_BYTES], headers=list(headers)
        )
        self.counter.labels(reason).inc()
        log.warning(
            "set aside a record it cannot process: %s",
            detail,
            extra={
                "consumer": self.consumer,
                "reason": reason,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )
