"""The ack discipline without servers: acks only after delivery, in receive order, with retry."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from cityops.common.kinds import Kind
from cityops.ingest.kafka_sink import R
from cityops.ingest.metrics import IngestMetrics
from cityops.ingest.mqtt_source import Inbound
from cityops.ingest.pipeline import Pipeline
from cityops.ingest.ratelimit import TokenBuckets
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
    max_in_flight: int = 100, *, by_topic: bool = False
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
        clock=lambda: NOW,
    )
    pipeline.bind(source)
    return pipeline, sink, source


def inbound(mid: int, device_id: str = "pk-0001", payload: bytes | None = None) -> Inbound:
    body = payload or orjson.dumps(
        {
            "device_id": device_id,
            "kind": "parking",
            "ts": "2026-11-26T08:15:00Z",
            "seq": mid,
            "occupied": True,
        }
    )
    return Inbound(mid, f"city/parking/{device_id}/telemetry".encode(), body, 1)


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
