"""A Kafka broker of its own: the stack's config and jars on other ports and a data dir of its own.

Fault tests and measurements that kill or restart a broker use it, never the shared one on
9092. `python -m cityops.stack.kafka_instance recovery` measures how long a broker killed with
`kill -9` takes to answer again (docs/stack.md has the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka.admin import NewTopic

from cityops.common.kafka import KafkaAccess, kafka_admin, kafka_producer
from cityops.stack import kafka
from cityops.stack.credentials import StackSecrets, load_or_create_secrets
from cityops.stack.kafka_principals import provision
from cityops.stack.layout import StackPaths, repo_root
from cityops.stack.probes import probe_kafka, wait_ready
from cityops.stack.procs import running_pid, start, stop


class KafkaInstance:
    """A single-node KRaft broker with SASL and ACLs, under `root`, on `port` and `port + 1`."""

    def __init__(self, root: Path, *, port: int, stack: StackPaths | None = None) -> None:
        self.port = port
        self.paths = StackPaths(repo=root)
        self.paths.ensure()
        self.layout = kafka.KafkaLayout(stack or StackPaths(repo=repo_root()), home=root / "kafka")
        self.spec = kafka.spec(self.paths, self.layout, ports=(port, port + 1))
        self.secrets: StackSecrets = load_or_create_secrets(self.paths)

    def admin(self) -> KafkaAccess:
        """The instance's admin principal."""
        return kafka.admin_access(self.secrets, port=self.port)

    def service(self, name: str) -> KafkaAccess:
        """Principal `name`'s SCRAM access on this instance (a service, or the admin)."""
        password = kafka.scram_passwords(self.secrets)[name]
        return KafkaAccess(f"127.0.0.1:{self.port}", username=name, password=password)

    def prepare(self) -> None:
        """Write the config and format the storage (once)."""
        kafka.write_config(
            self.layout,
            admin_password=self.secrets.kafka_admin_password,
            port=self.port,
            controller_port=self.port + 1,
        )
        kafka.ensure_formatted(self.layout)

    async def start(self, *, timeout_s: float = 180.0) -> float:
        """Start the broker; seconds until it answered the admin."""
        process = start(self.paths, self.spec)

        def alive() -> str | None:
            code = process.poll()
            return None if code is None else f"exit code {code}"

        return await wait_ready(
            "kafka", lambda: probe_kafka(self.admin()), timeout_s=timeout_s, alive=alive
        )

    async def provision(self) -> None:
        """The services' principals, their ACLs and the A4 topics, as `stack up` makes them."""
        access = self.admin()
        await provision(
            access, passwords=kafka.scram_passwords(self.secrets), topics=kafka.default_topics()
        )
        await kafka.ensure_default_topics(access)

    def kill(self) -> None:
        """`kill -9` the broker (no clean shutdown: the next start recovers its logs)."""
        pid = running_pid(self.paths, self.spec)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while running_pid(self.paths, self.spec) is not None:
                time.sleep(0.05)

    def stop(self) -> str:
        """Stop the broker cleanly (SIGTERM, bounded)."""
        return stop(self.paths, self.spec)


async def _fill(instance: KafkaInstance, *, records: int) -> None:
    producer = kafka_producer(instance.admin(), linger_ms=20, acks=1)
    await producer.start()
    try:
        topic = kafka.default_topics().telemetry
        value = b'{"fill_pct": 50.0, "pad": "' + b"x" * 200 + b'"}'
        for n in range(records):
            await producer.send(topic, key=f"dev-{n % 5000}".encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def _extra_topics(instance: KafkaInstance, *, count: int) -> None:
    # a shared test stack holds hundreds of 3-partition test topics: each is a log to load
    admin = kafka_admin(instance.admin())
    await admin.start()
    try:
        names = [f"scratch.recovery.{n:04d}" for n in range(count)]
        await admin.create_topics([NewTopic(name, 3, 1) for name in names])
    finally:
        await admin.close()


async def measure_recovery(
    root: Path, *, port: int, runs: int, records: int, extra_topics: int, clean: bool = False
) -> list[float]:
    """Seconds from `kill -9` (or a clean stop) to answering again, per run."""
    instance = KafkaInstance(root, port=port)
    instance.prepare()
    await instance.start()
    await instance.provision()
    await _extra_topics(instance, count=extra_topics)
    await _fill(instance, records=records)
    seconds: list[float] = []
    try:
        for _ in range(runs):
            if clean:  # what `cityops stack down` + `up` do: SIGTERM, controlled shutdown
                started = time.monotonic()
                instance.stop()
                stopped = time.monotonic() - started
                seconds.append(stopped + await instance.start())
            else:
                instance.kill()
                seconds.append(await instance.start())
    finally:
        instance.stop()
    return seconds


def main() -> None:
    """Median seconds from kill -9 (`recovery`) or a clean stop (`restart`) to answering."""
    parser = argparse.ArgumentParser(prog="python -m cityops.stack.kafka_instance")
    parser.add_argument("what", choices=["recovery", "restart"], help="kill -9, or clean stop")
    parser.add_argument("--port", type=int, default=29092)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--extra-topics", type=int, default=150, help="3-partition topics")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix=f"cityops-kafka-{uuid.uuid4().hex[:6]}-"))
    seconds = asyncio.run(
        measure_recovery(
            root,
            port=args.port,
            runs=args.runs,
            records=args.records,
            extra_topics=args.extra_topics,
            clean=args.what == "restart",
        )
    )
    how = "clean stop" if args.what == "restart" else "kill -9"
    print(
        f"{how} to answering: median {statistics.median(seconds):.1f} s "
        f"(runs {', '.join(f'{s:.1f}' for s in seconds)}; {args.records} records, "
        f"{args.extra_topics} extra topics; {root})"
    )


if __name__ == "__main__":
    main()
