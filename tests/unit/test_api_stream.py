"""SSE decoding and filtering: state changes only, registry updates feed district filters."""

from __future__ import annotations

from typing import Any

import orjson
from aiokafka import ConsumerRecord

from cityops.api.stream.broadcaster import (
    EventDecoder,
    Interest,
    StreamEvent,
    StreamFilter,
)


def rec(
    topic: str, body: Any, timestamp: int = 1000, key: bytes | None = None
) -> ConsumerRecord[bytes, bytes]:
    value = orjson.dumps(body)
    return ConsumerRecord(topic, 0, 1, timestamp, 0, key, value, None, 0, len(value), [])


def decoder() -> EventDecoder:
    return EventDecoder(telemetry_topic="t", status_topic="s", tickets_topic="k", devices_topic="d")


def reading(seq: int) -> dict[str, Any]:
    return {
        "device_id": "wb-1",
        "kind": "wastebin",
        "seq": seq,
        "ts": "2026-11-26T08:00:00+00:00",
        "fill_pct": 90.0,
        "received_at": "2026-11-26T08:00:01+00:00",
        "ingest_id": "i",
    }


def test_only_newer_readings_are_state_changes() -> None:
    d = decoder()
    d.decode(rec("d", {"device_id": "wb-1", "district": "old-town"}))
    first = d.decode(rec("t", reading(5), timestamp=1234))
    assert first is not None
    assert first.render().startswith(b"id: 1234\nevent: state\ndata: ")
    assert first.district == "old-town"
    assert orjson.loads(first.data)["values"] == {"fill_pct": 90.0}
    assert d.decode(rec("t", reading(5))) is None
    assert d.decode(rec("t", reading(4))) is None
    assert d.decode(rec("t", reading(6))) is not None


def test_status_and_ticket_events() -> None:
    d = decoder()
    status = d.decode(rec("s", {"device_id": "wb-1", "kind": "wastebin", "online": False}))
    assert status is not None
    assert (status.event_type, status.district) == ("connectivity", "unassigned")
    ticket = d.decode(rec("k", {"kind": "manhole", "district": "x", "ticket_id": 1}))
    assert ticket is not None
    assert (ticket.event_type, ticket.kind, ticket.district) == ("ticket", "manhole", "x")


def test_garbage_is_skipped() -> None:
    d = decoder()
    value = b"not json"
    garbage = ConsumerRecord("t", 0, 1, 0, 0, None, value, None, 0, len(value), [])
    assert d.decode(garbage) is None
    assert d.decode(rec("t", {"device_id": "wb-1"})) is None


def test_filters() -> None:
    event = StreamEvent(1, "state", "wastebin", "north", b"{}")
    assert StreamFilter().matches(event)
    assert StreamFilter(kinds=frozenset({"wastebin"})).matches(event)
    assert not StreamFilter(kinds=frozenset({"parking"})).matches(event)
    assert not StreamFilter(districts=frozenset({"south"})).matches(event)
    assert not StreamFilter(types=frozenset({"ticket"})).matches(event)


def test_interest_is_the_union_of_the_filters() -> None:
    one = StreamFilter(districts=frozenset({"north"}), types=frozenset({"state"}))
    two = StreamFilter(districts=frozenset({"south"}), types=frozenset({"ticket"}))
    assert Interest.of([one, two]) == Interest(
        frozenset({"state", "ticket"}), frozenset({"north", "south"})
    )
    # one client without a district filter wants every district
    assert Interest.of([one, StreamFilter(types=frozenset({"state"}))]).districts is None
    assert Interest.of([]) == Interest(None, None)


def test_records_nobody_wants_are_skipped_by_key_before_decoding() -> None:
    d = decoder()
    d.decode(rec("d", {"device_id": "wb-1", "district": "north"}))
    d.decode(rec("d", {"device_id": "wb-2", "district": "south"}))
    interest = Interest.of(
        [StreamFilter(districts=frozenset({"north"}), types=frozenset({"state"}))]
    )
    assert d.wanted(rec("t", reading(1), key=b"wb-1"), interest)
    assert not d.wanted(rec("t", reading(1), key=b"wb-2"), interest)
    assert not d.wanted(rec("t", reading(1), key=b"wb-unknown"), interest)  # "unassigned"
    assert not d.wanted(rec("s", {"device_id": "wb-1"}, key=b"wb-1"), interest)  # not a type
    assert d.wanted(rec("k", {"district": "south"}, key=b"wb-2"), interest)  # tickets: by value
    assert d.wanted(rec("d", {"device_id": "wb-3"}, key=b"wb-3"), interest)  # registry: always
    assert d.wanted(rec("t", reading(1), key=b"wb-2"), Interest(None, None))


def test_a_record_that_breaks_decoding_is_skipped_and_reported() -> None:
    skipped: list[str] = []
    d = EventDecoder(
        telemetry_topic="t",
        status_topic="s",
        tickets_topic="k",
        devices_topic="d",
        on_skip=skipped.append,
    )
    # str() of 1000 nested lists raises RecursionError (it ended the stream task on 0020c77)
    deep = b'{"kind": ' + b"[" * 1000 + b"]" * 1000 + b', "district": "x"}'
    value = b"not json"
    garbage = ConsumerRecord("t", 0, 1, 0, 0, None, value, None, 0, len(value), [])
    assert d.decode(ConsumerRecord("k", 0, 1, 0, 0, None, deep, None, 0, len(deep), [])) is None
    assert d.decode(garbage) is None
    assert d.decode(rec("s", {"kind": "wastebin"})) is None
    assert skipped == ["tickets", "telemetry", "status"]
    assert d.decode(rec("k", {"kind": "manhole", "district": "x"})) is not None
