"""The poison corpus of issue 12, as records produced straight into `city.telemetry.v1`.

Each is what a producer that bypassed ingest (or a bug in it) could write: ingest's validation
refuses all of them, so downstream consumers see them only from Kafka. Each entry is a wastebin
reading that would raise bin_full if it were valid, so a consumer that does not set it aside
either fails on it or opens a ticket for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import orjson

from cityops.common.kafka import KafkaAccess, kafka_consumer
from cityops.common.setaside import UNDECODABLE, UNPROCESSABLE


@dataclass(frozen=True)
class Poison:
    """One poison record: its name, key, raw value and how the projector classifies it."""

    name: str
    device_id: str
    value: bytes | None
    projector_reason: str


def _reading(device_id: str, *, ts: str | None = None, seq: object = 1, **extra: object) -> bytes:
    body = {
        "device_id": device_id,
        "kind": "wastebin",
        "ts": ts or datetime.now(UTC).isoformat(),
        "seq": seq,
        "fill_pct": 95.0,
        "received_at": datetime.now(UTC).isoformat(),
        "ingest_id": "poison",
        **extra,
    }
    return orjson.dumps(body)


def _replace(value: bytes, old: bytes, new: bytes) -> bytes:
    assert old in value
    return value.replace(old, new)


def corpus(prefix: str) -> list[Poison]:
    """Every poison class of issue 12 (devices named `<prefix>-<n>`)."""
    d = [f"{prefix}-{n}" for n in range(11)]
    deep = b"[" * 2000 + b"]" * 2000
    return [
        Poison("year 1", d[0], _reading(d[0], ts="0001-01-01T00:00:00+14:00"), UNDECODABLE),
        Poison("year 9999", d[1], _reading(d[1], ts="9999-12-31T23:59:59-14:00"), UNDECODABLE),
        Poison("NUL in a value", d[2], _reading(d[2], note="a\u0000b"), UNPROCESSABLE),
        Poison("NUL in the id", d[3], _reading(f"{d[3]}\u0000"), UNPROCESSABLE),
        Poison(
            "lone surrogate",
            d[4],
            _replace(_reading(d[4], note="SURROGATE"), b"SURROGATE", b"\\ud800"),
            UNDECODABLE,
        ),
        Poison(
            "number beyond float64",
            d[5],
            _replace(_reading(d[5], fill_pct=95.0), b"95.0", b"1e400"),
            UNDECODABLE,
        ),
        Poison("seq beyond int64", d[6], _reading(d[6], seq=2**63), UNDECODABLE),
        Poison(
            "seq beyond 64 bits",
            d[7],
            _replace(_reading(d[7], seq=7), b'"seq":7', b'"seq":' + str(2**70).encode()),
            UNDECODABLE,
        ),
        Poison(
            "deep metadata",
            d[8],
            _replace(_reading(d[8], note="DEEP"), b'"DEEP"', deep),
            UNDECODABLE,
        ),
        Poison("not JSON", d[9], b"\xff\xfe not json", UNDECODABLE),
        Poison("empty value", d[10], None, UNDECODABLE),
    ]


async def ready_and_counted(http: httpx.AsyncClient, *, check: str, counter: str) -> float:
    """Assert /readyz is 200 with `check` true; return the sum of `counter` over its labels."""
    response = await http.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"][check] is True
    metrics = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(counter + "{")
    )


async def dead_letters(
    access: KafkaAccess, topic: str, *, expected: int, timeout_s: float = 30
) -> list[dict[str, str]]:
    """Read the dead-letter topic from the start until `expected` records (their headers)."""
    consumer = kafka_consumer(access, topic, auto_offset_reset="earliest")
    await consumer.start()
    found: list[dict[str, str]] = []
    try:
        loop_deadline = datetime.now(UTC).timestamp() + timeout_s
        while len(found) < expected and datetime.now(UTC).timestamp() < loop_deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    headers: Mapping[str, bytes] = dict(record.headers)
                    found.append({k: v.decode("utf-8", "replace") for k, v in headers.items()})
    finally:
        await consumer.stop()
    return found
