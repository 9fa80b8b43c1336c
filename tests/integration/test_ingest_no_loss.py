"""No reading lost: kill -9 mid-stream, Kafka unreachable mid-stream, SIGTERM, two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from cityops.common.kinds import Kind
from cityops.stack.layout import StackPaths, repo_root
from tests.helpers import wait_for
from tests.integration.ingest_support import (
    IngestCase,
    TopicReader,
    gateway,
    ingest_in_process,
    metric_value,
    past,
    publish_all,
    reading,
    readyz,
    seqs_of,
    start_subprocess,
    wait_ready,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]

# A high budget: these tests are about loss, not rate limiting.
FAST = {"CITYOPS_INGEST_RATE_PER_S": "100000", "CITYOPS_INGEST_RATE_BURST": "100000"}


class Stream:
    """Publishes seq 0..count-1 for one device from a thread, paced, so tests can act mid-way."""

    def __init__(self, case: IngestCase, device_id: str, count: int, *, chunk: int = 100) -> None:
        self.case = case
        self.device_id = device_id
        self.count = count
        self.chunk = chunk
        self.published = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            client = gateway(self.case.mqtt)
            try:
                start = past(self.count)
                topic = f"city/parking/{self.device_id}/telemetry"
                for first in range(0, self.count, self.chunk):
                    batch = [
                        (
                            topic,
                            reading(
                                self.device_id,
                                "parking",
                                seq,
                                start.replace(microsecond=0) + _seconds(seq),
                            ),
                        )
                        for seq in range(first, min(first + self.chunk, self.count))
                    ]
                    publish_all(client, batch)
                    self.published += len(batch)
                    time.sleep(0.02)  # paced: the stream must still be flowing when we strike
            finally:
                client.close()
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    async def wait(self) -> None:
        await asyncio.to_thread(self._thread.join, 120)
        assert self.error is None, self.error
        assert self.published == self.count


def _seconds(n: int) -> timedelta:
    return timedelta(seconds=n)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def test_kill_9_mid_stream_loses_nothing(case: IngestCase) -> None:
    device = case.device("pk-crash")
    await case.seed({device: Kind.PARKING})
    env = case.replica_env(0, **FAST)
    port = int(env["CITYOPS_METRICS_PORT"])
    first = start_subprocess(case, env)
    await wait_ready(port)
    count = 6000
    stream = Stream(case, device, count)
    async with TopicReader(case.kafka.admin, case.telemetry) as telemetry:
        stream.start()
        await telemetry.until(
            lambda rs: len(seqs_of(rs, device)) >= 1000, within_s=30, message="1000 in Kafka"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = len(seqs_of(telemetry.records, device))
        assert stream.published < count, "the stream finished before the kill: not mid-stream"
        second = start_subprocess(case, env)
        await wait_ready(port)
        await stream.wait()
        await telemetry.until(
            lambda rs: seqs_of(rs, device) == set(range(count)),
            within_s=60,
            message="every seq after the restart",
        )
        assert second.poll() is None
    assert killed_at < count
    # at-least-once: duplicates allowed, gaps not (checked above); records are keyed right
    assert all(r.key == device.encode() for r in telemetry.records if r.key == device.encode())


async def test_sigterm_drains_acks_and_exits_cleanly(case: IngestCase) -> None:
    device = case.device("pk-term")
    await case.seed({device: Kind.PARKING})
    env = case.replica_env(0, **FAST)
    port = int(env["CITYOPS_METRICS_PORT"])
    process = start_subprocess(case, env)
    await wait_ready(port)
    count = 4000
    stream = Stream(case, device, count)
    async with TopicReader(case.kafka.admin, case.telemetry) as telemetry:
        stream.start()
        await telemetry.until(
            lambda rs: len(seqs_of(rs, device)) >= 500, within_s=30, message="500 in Kafka"
        )
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
        restarted = start_subprocess(case, env)
        await wait_ready(port)
        await stream.wait()
        await telemetry.until(
            lambda rs: seqs_of(rs, device) == set(range(count)),
            within_s=60,
            message="every seq",
        )
        await telemetry.poll()
        assert restarted.poll() is None
    mine = [r for r in telemetry.records if r.key == device.encode()]
    # Everything read before SIGTERM was produced and acked before DISCONNECT: no redelivery.
    assert len(mine) == count
    log_path = Path(f"/tmp/cityops-ingest-test-{env['CITYOPS_INSTANCE_ID']}.log")
    log_text = await asyncio.to_thread(log_path.read_text)
    assert '"msg":"ingest stopped"' in log_text
    assert '"drained":true' in log_text


@contextlib.contextmanager
def kafka_paused() -> Iterator[int]:
    """SIGSTOP the shared Kafka broker (a few seconds only), SIGCONT it on the way out."""
    pid = int(StackPaths(repo=repo_root()).pid_file("kafka").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_kafka_unreachable_mid_stream_loses_nothing_and_memory_stays_bounded(
    case: IngestCase,
) -> None:
    device = case.device("pk-kafka")
    await case.seed({device: Kind.PARKING})
    env = case.replica_env(0, CITYOPS_INGEST_KAFKA_STALL_S="1", **FAST)
    port = int(env["CITYOPS_METRICS_PORT"])
    process = start_subprocess(case, env)
    await wait_ready(port)
    count = 6000
    stream = Stream(case, device, count)
    rss_samples: list[int] = []
    in_flight_samples: list[float] = []
    async with TopicReader(case.kafka.admin, case.telemetry) as telemetry:
        stream.start()
        await telemetry.until(
            lambda rs: len(seqs_of(rs, device)) >= 500, within_s=30, message="500 in Kafka"
        )
        with kafka_paused():
            published_at_pause = stream.published
            rss_before = rss_bytes(process.pid)

            async def not_ready() -> bool:
                body = await asyncio.to_thread(readyz, port)
                return bool(body) and body is not None and body["checks"]["kafka"] is False

            await wait_for(not_ready, timeout=4, interval=0.1, message="/readyz fails")
            for _ in range(10):  # ~3 s of the outage, sampled
                rss_samples.append(rss_bytes(process.pid))
                in_flight_samples.append(
                    await asyncio.to_thread(metric_value, port, "cityops_ingest_in_flight_messages")
                )
                await asyncio.sleep(0.3)
        await stream.wait()
        await telemetry.until(
            lambda rs: seqs_of(rs, device) == set(range(count)),
            within_s=90,
            message="every seq after Kafka came back",
        )
        await wait_ready(port, within_s=30)
    assert published_at_pause < count, "the stream finished before the outage"
    assert max(in_flight_samples) <= 1000  # the window, not the backlog
    assert max(rss_samples) - rss_before < 30 * 1024 * 1024
    assert process.poll() is None


async def test_two_replicas_split_one_stream(case: IngestCase) -> None:
    devices = {case.device(f"pk-{n}"): Kind.PARKING for n in range(10)}
    await case.seed(devices)
    env_a = case.replica_env(0, **FAST)
    env_b = case.replica_env(1, **FAST)
    per_device = 200
    publisher = await asyncio.to_thread(gateway, case.mqtt)
    try:
        async with (
            ingest_in_process(env_a),
            ingest_in_process(env_b),
            TopicReader(case.kafka.admin, case.telemetry) as telemetry,
        ):
            start = past(per_device)
            messages = [
                (
                    f"city/parking/{device}/telemetry",
                    reading(device, "parking", seq, start + _seconds(seq)),
                )
                for seq in range(per_device)
                for device in devices
            ]
            await asyncio.to_thread(publish_all, publisher, messages)
            await telemetry.until(
                lambda rs: all(seqs_of(rs, d) == set(range(per_device)) for d in devices),
                within_s=60,
                message="every seq of every device",
            )
    finally:
        await asyncio.to_thread(publisher.close)
    by_replica: dict[str, int] = {}
    for record in telemetry.records:
        if record.key is not None and record.key.decode() in devices:
            replica = orjson.loads(record.value)["ingest_id"]
            by_replica[replica] = by_replica.get(replica, 0) + 1
    total = sum(by_replica.values())
    assert set(by_replica) == {env_a["CITYOPS_INSTANCE_ID"], env_b["CITYOPS_INSTANCE_ID"]}
    assert total >= per_device * len(devices)
    assert min(by_replica.values()) > total * 0.2  # both did real work
