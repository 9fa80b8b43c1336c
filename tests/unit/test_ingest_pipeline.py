"""The ack discipline without servers: acks only after delivery, in receive order, with retry."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from cityops.common.kinds import Kind
from cityops.ingest.deadletters import RejectBudget
from cityops.ingest.kafka_sink import R
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.mqtt_source import Inbound
from cityops.ingest.pipeline import Pipeline
from cityops.ingest.ratelimit import TokenBuckets
from cityops.ingest.registry_cache import RegistryCache
from cityops.ingest.registry_lookup import DeviceRow, MissResolver
from cityops.ingest.validate import OutputTopics, Validator
from tests.helpers import wait_for

NOW = datetime(2026, 11, 26, 8, 15, 30, tzinfo=UTC)


class Registry:
    def kind_of(self, device_id: str) -> Kind | None:
        return Kind.PARKING if device_id.startswith("pk-") else None


class FakeSink:
    """Records sends; the test decides when (and whether) each delivery succeeds.

    By default every record is its own batch (one future each); with `by_topic` the records of
    one `send_many` call are grouped per topic, the way the real sink groups per partition.
    """

    def __init__(self, *, by_topic: bool = False) -> None:
        self.by_topic = by_topic
        self.sent: list[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]] | None]] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.calls = 0

    async def send_many(self, records: Sequence[R]) -> list[tuple[asyncio.Future[Any], list[R]]]:
        self.calls += 1
        loop = asyncio.get_running_loop()
        groups: dict[str, list[R]] = {}
        out: list[tuple[asyncio.Future[Any], list[R]]] = []
        for record in records:
            self.sent.append((record.topic, record.key, record.value, record.headers))
            if self.by_topic:
                groups.setdefault(record.topic, []).append(record)
            else:
                out.append((loop.create_future(), [record]))
        out.extend((loop.create_future(), group) for group in groups.values())
        self.futures.extend(future for future, _ in out)
        return out


class FakeSource:
    def __init__(self) -> None:
        self.acked: list[int] = []
        self.paused = 0
        self.resumed = 0
        self.generation = 1

    def ack(self, mid: int, generation: int) -> None:
        if generation == self.generation:
            self.acked.append(mid)

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.resumed += 1


def make(
    max_in_flight: int = 100,
    *,
    by_topic: bool = False,
    budget: RejectBudget | None = None,
    summary_interval_s: float = 10.0,
) -> tuple[Pipeline, FakeSink, FakeSource]:
    validator = Validator(
        registry=Registry(),
        telemetry_limiter=TokenBuckets(rate_per_s=1000, burst=1000),
        status_limiter=TokenBuckets(rate_per_s=1000, burst=1000),
        ingest_id="unit",
        topics=OutputTopics(telemetry="tel", status="st", deadletter="dl"),
    )
    sink = FakeSink(by_topic=by_topic)
    source = FakeSource()
    pipeline = Pipeline(
        validator=validator,
        sink=sink,
        metrics=IngestMetrics.create(CollectorRegistry()),
        ingest_id="unit",
        max_in_flight=max_in_flight,
        reject_budget=budget,
        summary_interval_s=summary_interval_s,
        clock=lambda: NOW,
    )
    pipeline.bind(source)
    return pipeline, sink, source


def inbound(
    mid: int, device_id: str = "pk-0001", payload: bytes | None = None, *, retained: bool = False
) -> Inbound:
    body = payload or orjson.dumps(
        {
            "device_id": device_id,
            "kind": "parking",
            "ts": "2026-11-26T08:15:00Z",
            "seq": mid,
            "occupied": True,
        }
    )
    return Inbound(mid, f"city/parking/{device_id}/telemetry".encode(), body, 1, retained)


async def test_acks_wait_for_delivery_and_keep_receive_order() -> None:
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2), inbound(3, payload=b"junk")])
    await wait_for(lambda: len(sink.sent) == 3, timeout=2)
    assert [s[0] for s in sink.sent] == ["tel", "tel", "dl"]
    assert sink.sent[2][2] == b"junk"  # original bytes in the dead letter
    assert dict(sink.sent[2][3] or [])["reason"] == b"not_json"
    assert source.acked == []
    sink.futures[2].set_result(None)  # the last one first: nothing may be acked yet
    sink.futures[1].set_result(None)
    await asyncio.sleep(0)
    assert source.acked == []
    sink.futures[0].set_result(None)
    await wait_for(lambda: source.acked == [1, 2, 3], timeout=2)
    assert pipeline.stats.accepted == 2
    assert pipeline.stats.rejected == 1
    assert await pipeline.close(within_s=1)
    await runner


async def test_a_failed_delivery_is_retried_and_holds_back_later_acks() -> None:
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2)])
    await wait_for(lambda: len(sink.sent) == 2, timeout=2)
    sink.futures[0].set_exception(ConnectionError("broker gone"))
    sink.futures[1].set_result(None)
    await asyncio.sleep(0.05)
    assert source.acked == []
    await wait_for(lambda: len(sink.sent) == 3, timeout=3)  # the retry
    assert sink.sent[2] == sink.sent[0]
    sink.futures[2].set_result(None)
    await wait_for(lambda: source.acked == [1, 2], timeout=2)
    assert pipeline.stats.delivery_failures == 1
    assert await pipeline.close(within_s=1)
    await runner


async def test_a_full_window_pauses_the_source_and_draining_resumes_it() -> None:
    pipeline, sink, source = make(max_in_flight=4)
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(n) for n in range(1, 5)])
    assert source.paused == 1
    await wait_for(lambda: len(sink.sent) == 4, timeout=2)
    for future in sink.futures:
        future.set_result(None)
    await wait_for(lambda: source.resumed == 1, timeout=2)
    assert pipeline.in_flight == 0
    assert await pipeline.close(within_s=1)
    await runner


async def test_messages_from_an_old_connection_are_not_acked_on_the_new_one() -> None:
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1)])
    await wait_for(lambda: len(sink.sent) == 1, timeout=2)
    source.generation = 2  # reconnected: the broker redelivers mid 1 on the new connection
    sink.futures[0].set_result(None)
    await wait_for(lambda: pipeline.in_flight == 0, timeout=2)
    assert source.acked == []
    assert await pipeline.close(within_s=1)
    await runner


async def test_close_reports_undelivered_work() -> None:
    pipeline, sink, _source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1)])
    await wait_for(lambda: len(sink.sent) == 1, timeout=2)
    assert await pipeline.close(within_s=0.1) is False
    sink.futures[0].set_result(None)
    await runner


async def test_invalid_utf8_topic_is_dead_lettered() -> None:
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([Inbound(9, b"city/parking/\xff\xfe/telemetry", b"{}", 1)])
    await wait_for(lambda: len(sink.sent) == 1, timeout=2)
    topic, key, value, headers = sink.sent[0]
    assert (topic, key, value) == ("dl", None, b"{}")
    assert dict(headers or [])["reason"] == b"topic"
    sink.futures[0].set_result(None)
    await wait_for(lambda: source.acked == [9], timeout=2)
    assert await pipeline.close(within_s=1)
    await runner


async def test_one_turn_goes_out_as_one_batch_per_topic_and_acks_keep_receive_order() -> None:
    pipeline, sink, source = make(by_topic=True)
    runner = asyncio.create_task(pipeline.run())
    # Interleaved: tel, dl, tel, dl, tel -> two batches, each spanning the others' entries.
    pipeline.submit(
        [
            inbound(1),
            inbound(2, payload=b"junk"),
            inbound(3),
            inbound(4, payload=b"{}"),
            inbound(5),
        ]
    )
    await wait_for(lambda: len(sink.sent) == 5, timeout=2)
    assert sink.calls == 1
    assert len(sink.futures) == 2  # tel batch (1, 3, 5), dl batch (2, 4)
    tel, dl = sink.futures
    dl.set_result(None)  # the later batch first: 1 is not delivered, nothing may be acked
    await asyncio.sleep(0)
    assert source.acked == []
    tel.set_result(None)
    await wait_for(lambda: source.acked == [1, 2, 3, 4, 5], timeout=2)
    assert pipeline.in_flight == 0
    assert await pipeline.close(within_s=1)
    await runner


async def test_a_failed_batch_is_resent_whole_and_holds_back_only_what_follows_it() -> None:
    pipeline, sink, source = make(by_topic=True)
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2, payload=b"junk"), inbound(3)])
    await wait_for(lambda: len(sink.futures) == 2, timeout=2)
    tel, dl = sink.futures
    tel.set_exception(ConnectionError("broker gone"))  # 1 and 3 failed together
    dl.set_result(None)
    await asyncio.sleep(0.05)
    assert source.acked == []  # 2 is delivered but 1 ahead of it is not
    await wait_for(lambda: len(sink.futures) == 3, timeout=3)  # the resend: one batch, 1 and 3
    assert [s[2] for s in sink.sent[3:]] == [sink.sent[0][2], sink.sent[2][2]]
    assert pipeline.stats.delivery_failures == 2
    sink.futures[2].set_result(None)
    await wait_for(lambda: source.acked == [1, 2, 3], timeout=2)
    assert await pipeline.close(within_s=1)
    await runner


async def test_a_sink_that_raises_is_retried_like_a_failed_delivery() -> None:
    pipeline, sink, source = make()
    calls = 0
    real_send_many = sink.send_many

    async def flaky(records: Sequence[R]) -> list[tuple[asyncio.Future[Any], list[R]]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("producer closed")
        return await real_send_many(records)

    sink.send_many = flaky  # type: ignore[method-assign]
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2)])
    await wait_for(lambda: len(sink.futures) == 2, timeout=3)
    for future in sink.futures:
        future.set_result(None)
    await wait_for(lambda: source.acked == [1, 2], timeout=2)
    assert pipeline.stats.delivery_failures == 2
    assert await pipeline.close(within_s=1)
    await runner


# ---- registry misses: held for one lookup, decided in receive order ------------------------


class Lookups:
    """The lookup's database: `rows` it knows; `gate`, when set, holds each query until opened."""

    def __init__(self, rows: Sequence[DeviceRow] = ()) -> None:
        self.rows = {r.device_id: r for r in rows}
        self.queries: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, device_ids: Sequence[str]) -> list[DeviceRow]:
        self.queries.append(list(device_ids))
        if self.gate is not None:
            await self.gate.wait()
        return [self.rows[d] for d in device_ids if d in self.rows]


def make_with_lookup(
    lookups: Lookups, *, max_ids: int = 100
) -> tuple[Pipeline, FakeSink, FakeSource, RegistryCache]:
    cache = RegistryCache()
    cache.replace([DeviceRow("pk-0001", Kind.PARKING, True, NOW)])
    metrics = IngestMetrics.create(CollectorRegistry())
    validator = Validator(
        registry=cache,
        telemetry_limiter=TokenBuckets(rate_per_s=1000, burst=1000),
        status_limiter=TokenBuckets(rate_per_s=1000, burst=1000),
        ingest_id="unit",
        topics=OutputTopics(telemetry="tel", status="st", deadletter="dl"),
    )
    resolver = MissResolver(
        cache=cache, fetch=lookups, metrics=metrics, max_ids=max_ids, absent_ttl_s=60, timeout_s=1
    )
    sink = FakeSink()
    source = FakeSource()
    pipeline = Pipeline(
        validator=validator,
        sink=sink,
        metrics=metrics,
        ingest_id="unit",
        max_in_flight=100,
        resolver=resolver,
        clock=lambda: NOW,
    )
    pipeline.bind(source)
    return pipeline, sink, source, cache


async def test_a_device_found_on_lookup_is_accepted_in_its_place() -> None:
    lookups = Lookups([DeviceRow("pk-new", Kind.PARKING, True, NOW)])
    pipeline, sink, source, cache = make_with_lookup(lookups)
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2, "pk-new"), inbound(3), inbound(4, "pk-new")])
    await wait_for(lambda: len(sink.sent) == 4, timeout=2)
    assert lookups.queries == [["pk-new"]]  # one query for the turn, the id once
    assert [s[0] for s in sink.sent] == ["tel"] * 4
    assert [orjson.loads(s[2])["seq"] for s in sink.sent] == [1, 2, 3, 4]  # receive order
    assert cache.kind_of("pk-new") is Kind.PARKING
    for future in sink.futures:
        future.set_result(None)
    await wait_for(lambda: source.acked == [1, 2, 3, 4], timeout=2)
    assert pipeline.stats.received == 4
    assert pipeline.stats.accepted == 4
    assert await pipeline.close(within_s=1)
    await runner


async def test_bogus_ids_cost_one_query_then_the_negative_cache_answers() -> None:
    lookups = Lookups()
    pipeline, sink, source, _ = make_with_lookup(lookups, max_ids=3)
    runner = asyncio.create_task(pipeline.run())
    bogus = [inbound(n, f"pk-bogus-{n % 5}") for n in range(1, 11)]  # 5 distinct ids
    pipeline.submit(bogus)
    await wait_for(lambda: len(sink.sent) == 10, timeout=2)
    assert len(lookups.queries) == 1
    assert len(lookups.queries[0]) == 3  # capped; the other two ids were decided at once
    assert all(s[0] == "dl" and dict(s[3] or [])["reason"] == b"unknown_device" for s in sink.sent)
    pipeline.submit([inbound(n, f"pk-bogus-{n % 5}") for n in range(11, 21)])
    await wait_for(lambda: len(sink.sent) == 20, timeout=2)
    # The three absent ids are remembered; only the two never looked up are asked about.
    assert len(lookups.queries) == 2
    assert sorted(lookups.queries[1]) == ["pk-bogus-0", "pk-bogus-4"]
    pipeline.submit([inbound(n, f"pk-bogus-{n % 5}") for n in range(21, 31)])
    await wait_for(lambda: len(sink.sent) == 30, timeout=2)
    assert len(lookups.queries) == 2
    for future in sink.futures:
        future.set_result(None)
    await wait_for(lambda: source.acked == list(range(1, 31)), timeout=2)
    assert pipeline.stats.rejected == 30
    assert pipeline.stats.reasons == {"unknown_device": 30}
    assert await pipeline.close(within_s=1)
    await runner


async def test_messages_held_for_a_lookup_keep_close_waiting_and_later_ones_behind_them() -> None:
    lookups = Lookups([DeviceRow("pk-new", Kind.PARKING, True, NOW)])
    lookups.gate = asyncio.Event()
    pipeline, sink, source, _ = make_with_lookup(lookups)
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1), inbound(2, "pk-new")])
    await wait_for(lambda: lookups.queries, timeout=2)
    pipeline.submit([inbound(3)])  # arrives while the lookup is out
    assert pipeline.in_flight == 3  # held messages still count against the window
    closing = asyncio.create_task(pipeline.close(within_s=2))
    await asyncio.sleep(0.05)
    assert sink.sent == []  # nothing overtakes the held message
    assert not closing.done()
    lookups.gate.set()
    await wait_for(lambda: len(sink.sent) == 3, timeout=2)
    assert [orjson.loads(s[2])["seq"] for s in sink.sent] == [1, 2, 3]
    for future in sink.futures:
        future.set_result(None)
    assert await closing
    assert source.acked == [1, 2, 3]
    await runner


def deliver_all(sink: FakeSink) -> None:
    for future in sink.futures:
        if not future.done():
            future.set_result(None)


async def test_a_retained_delivery_is_dead_lettered_not_produced_as_a_reading() -> None:
    """Issue 11 row 7: a retained reading replayed at every subscribe is not a new reading."""
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1, retained=True), inbound(2)])
    await wait_for(lambda: len(sink.sent) == 2, timeout=2)
    (dl_topic, key, value, headers), (tel_topic, *_) = sink.sent
    assert (dl_topic, key, tel_topic) == ("dl", b"pk-0001", "tel")
    assert value == inbound(1).payload
    assert dict(headers or [])["reason"] == b"retained"
    deliver_all(sink)
    await wait_for(lambda: source.acked == [1, 2], timeout=2)
    assert await pipeline.close(within_s=1)
    await runner


async def test_rejects_past_the_budget_are_counted_acked_in_order_and_summarised() -> None:
    pipeline, sink, source = make(
        budget=RejectBudget(rate_per_s=0.001, burst=3), summary_interval_s=0.05
    )
    runner = asyncio.create_task(pipeline.run())
    batch = [inbound(n, payload=b"junk") for n in range(1, 11)]
    batch.insert(5, inbound(99))  # a valid reading among them still goes through
    pipeline.submit(batch)
    await wait_for(lambda: len(sink.sent) == 4, timeout=2)
    assert [(t, v) for t, _, v, _ in sink.sent[:3]] == [("dl", b"junk")] * 3
    assert orjson.loads(sink.sent[3][2])["seq"] == 99
    assert source.acked == []  # suppressed ones behind undelivered records wait their turn
    deliver_all(sink)
    await wait_for(lambda: source.acked == [m.mid for m in batch], timeout=2)
    await wait_for(lambda: len(sink.sent) == 5, timeout=2)  # the summary, one interval later
    topic, key, value, headers = sink.sent[4]
    summary = dict(headers or [])
    assert (topic, key, value) == ("dl", b"pk-0001", b"")
    assert (summary["reason"], summary["suppressed"]) == (b"not_json", b"7")
    assert pipeline.stats.rejected == 10
    deliver_all(sink)
    # A turn of suppressed rejects only: acked at once, there is nothing to wait for.
    pipeline.submit([inbound(n, payload=b"junk") for n in range(20, 25)])
    await wait_for(lambda: source.acked[-5:] == list(range(20, 25)), timeout=2)
    sent = len(sink.sent)
    closing = asyncio.create_task(pipeline.close(within_s=2))  # produces their summary
    await wait_for(lambda: len(sink.sent) == sent + 1, timeout=2)
    assert dict(sink.sent[-1][3] or [])["suppressed"] == b"5"
    deliver_all(sink)
    assert await closing
    await runner


async def test_close_produces_the_pending_summary() -> None:
    pipeline, sink, _source = make(budget=RejectBudget(rate_per_s=0.001, burst=1))
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1, payload=b"junk"), inbound(2, payload=b"junk")])
    await wait_for(lambda: len(sink.sent) == 1, timeout=2)
    deliver_all(sink)
    closing = asyncio.create_task(pipeline.close(within_s=2))
    await wait_for(lambda: len(sink.sent) == 2, timeout=2)
    assert dict(sink.sent[1][3] or [])["suppressed"] == b"1"
    deliver_all(sink)
    assert await closing
    await runner


async def test_an_oversize_payload_keeps_a_prefix_its_size_and_hash() -> None:
    pipeline, sink, source = make()
    runner = asyncio.create_task(pipeline.run())
    huge = bytes(range(256)) * 800
    pipeline.submit([inbound(1, payload=huge)])
    await wait_for(lambda: len(sink.sent) == 1, timeout=2)
    _, _, value, headers = sink.sent[0]
    found = dict(headers or [])
    assert found["reason"] == b"too_large"
    assert value == huge[:4096]
    assert found["original_size"] == str(len(huge)).encode()
    assert found["sha256"] == hashlib.sha256(huge).hexdigest().encode()
    deliver_all(sink)
    await wait_for(lambda: source.acked == [1], timeout=2)
    assert await pipeline.close(within_s=1)
    await runner


async def test_a_validation_bug_dead_letters_the_message_and_the_loop_goes_on() -> None:
    pipeline, sink, source = make()
    real = pipeline._validator.validate

    def validate(mqtt_topic: str, payload: bytes, now: datetime) -> Any:
        if payload == b"boom":
            raise OverflowError("date value out of range")
        return real(mqtt_topic, payload, now)

    pipeline._validator.validate = validate  # type: ignore[method-assign]
    runner = asyncio.create_task(pipeline.run())
    pipeline.submit([inbound(1, payload=b"boom"), inbound(2)])
    await wait_for(lambda: len(sink.sent) == 2, timeout=2)
    assert dict(sink.sent[0][3] or [])["reason"] == b"unprocessable"
    assert sink.sent[1][0] == "tel"
    deliver_all(sink)
    await wait_for(lambda: source.acked == [1, 2], timeout=2)
    assert await pipeline.close(within_s=1)
    await runner
