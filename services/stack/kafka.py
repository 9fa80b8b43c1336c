"""Kafka broker from Maven Central jars: resolve libs, write config, format KRaft storage once."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from cityops.common.kafka import KafkaAccess, ensure_topics
from cityops.common.settings import KafkaSettings
from cityops.common.topics import DEADLETTER_TOPIC_CONFIG
from cityops.stack.layout import StackError, StackPaths
from cityops.stack.procs import ServerSpec, run_command, write_if_changed

BOOTSTRAP = "127.0.0.1:9092"
PORT = 9092
CONTROLLER_PORT = 9093
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
HEAP = "512m"

LOG4J2_PROPERTIES = """\
# written by `cityops stack up`: the broker logs to server.log, rotated at 50 MB, 5 kept
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 5
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.kafka_request.name = kafka.request.logger
logger.kafka_request.level = WARN
logger.state_change.name = state.change.logger
logger.state_change.level = WARN
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
"""


class KafkaLayout:
    """Paths under `.stack/kafka`."""

    def __init__(self, paths: StackPaths) -> None:
        self.home = paths.root / "kafka"
        self.libs = self.home / "libs"
        self.stamp = self.libs / ".pom.sha256"
        self.data = self.home / "data"
        self.logs = self.home / "logs"
        self.server_properties = self.home / "server.properties"
        self.log4j2 = self.home / "log4j2.properties"
        self.cluster_id_file = self.home / "cluster.id"
        self.pom = paths.deploy / "kafka" / "pom.xml"


def server_properties(layout: KafkaLayout) -> str:
    """Single-node KRaft (broker + controller) on loopback; every internal topic RF 1."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{CONTROLLER_PORT}",
        "listeners": f"PLAINTEXT://127.0.0.1:{PORT},CONTROLLER://127.0.0.1:{CONTROLLER_PORT}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{PORT}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(layout.data),
        "num.partitions": "12",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # more replicas than brokers for an internal topic makes InitProducerId hang forever
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "12",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # topics are created on purpose (services' ensure_topics, test fixtures), never by a typo
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "log.retention.hours": "168",
        "log.segment.bytes": str(256 * 1024 * 1024),
        "num.network.threads": "3",
        "num.io.threads": "4",
    }
    header = "# written by `cityops stack up`; edit services/stack/kafka.py, not this file\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def pom_digest(pom: Path) -> str:
    """sha256 of the checked-in pom: the libs folder is current when its stamp matches."""
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def ensure_libs(layout: KafkaLayout) -> bool:
    """Copy the pom's runtime jars into `.stack/kafka/libs` unless they match; True if resolved."""
    digest = pom_digest(layout.pom)
    if layout.stamp.exists() and layout.stamp.read_text(encoding="utf-8").strip() == digest:
        return False
    print("stack: resolving Kafka jars with Maven (first run downloads ~100 MB)", flush=True)
    staging = layout.home / "libs.new"
    shutil.rmtree(staging, ignore_errors=True)
    layout.home.mkdir(parents=True, exist_ok=True)
    run_command(
        [
            "mvn",
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(layout.pom),
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        what="resolving Kafka jars (mvn copy-dependencies)",
        timeout_s=1200,
    )
    if not any(staging.glob("kafka_2.13-*.jar")):
        raise StackError(f"mvn ran but {staging} holds no kafka_2.13 jar")
    # swap whole folders: jars of an older pom must not linger on the classpath
    shutil.rmtree(layout.libs, ignore_errors=True)
    staging.rename(layout.libs)
    layout.stamp.write_text(digest + "\n", encoding="utf-8")
    return True


def _classpath(layout: KafkaLayout) -> str:
    return f"{layout.libs}/*"


def cluster_id(layout: KafkaLayout) -> str:
    """The persisted cluster id, generated once with StorageTool."""
    if layout.cluster_id_file.exists():
        return layout.cluster_id_file.read_text(encoding="utf-8").strip()
    meta = layout.data / "meta.properties"
    if meta.exists():  # formatted earlier but cluster.id lost: keep what the storage says
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.startswith("cluster.id="):
                found = line.partition("=")[2].strip()
                layout.cluster_id_file.write_text(found + "\n", encoding="utf-8")
                return found
    generated = (
        run_command(
            ["java", "-cp", _classpath(layout), "kafka.tools.StorageTool", "random-uuid"],
            what="generating a Kafka cluster id",
        )
        .strip()
        .splitlines()[-1]
    )
    layout.cluster_id_file.write_text(generated + "\n", encoding="utf-8")
    return generated


def ensure_formatted(layout: KafkaLayout) -> bool:
    """Format KRaft storage once; a half-formatted log dir stops with what to delete."""
    meta = layout.data / "meta.properties"
    if meta.exists():
        return False
    if layout.data.exists() and any(layout.data.iterdir()):
        raise StackError(
            f"Kafka log dir {layout.data} is not empty but has no meta.properties "
            f"(half-formatted): delete {layout.data} and run `cityops stack up` again"
        )
    layout.data.mkdir(parents=True, exist_ok=True)
    run_command(
        [
            "java",
            "-cp",
            _classpath(layout),
            f"-Dlog4j2.configurationFile={layout.log4j2}",
            f"-Dkafka.logs.dir={layout.logs}",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            cluster_id(layout),
            "-c",
            str(layout.server_properties),
        ],
        what="formatting Kafka storage (StorageTool format)",
    )
    return True


def prepare(paths: StackPaths) -> bool:
    """Libs, config and storage; returns whether the broker config changed on disk."""
    layout = KafkaLayout(paths)
    ensure_libs(layout)
    layout.logs.mkdir(parents=True, exist_ok=True)
    changed = write_if_changed(layout.server_properties, server_properties(layout))
    changed |= write_if_changed(layout.log4j2, LOG4J2_PROPERTIES)
    ensure_formatted(layout)
    return changed


def spec(paths: StackPaths) -> ServerSpec:
    """How to run the broker (what bin/kafka-server-start.sh does, with a 512 MB heap)."""
    layout = KafkaLayout(paths)
    return ServerSpec(
        name="kafka",
        argv=[
            "java",
            f"-Xms{HEAP}",
            f"-Xmx{HEAP}",
            "-server",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={layout.logs}",
            f"-Dlog4j2.configurationFile={layout.log4j2}",
            "-cp",
            _classpath(layout),
            "kafka.Kafka",
            str(layout.server_properties),
        ],
        marker=str(layout.server_properties),
        ports=(PORT, CONTROLLER_PORT),
        cwd=layout.home,
        stop_timeout_s=60.0,
    )


async def ensure_default_topics(access: KafkaAccess) -> list[str]:
    """Create the A4 topics (names from CITYOPS_TOPIC_* or their defaults); returns new ones."""
    settings = KafkaSettings(kafka_bootstrap=access.bootstrap)
    names = [
        settings.topic_telemetry,
        settings.topic_status,
        settings.topic_deadletter,
        settings.topic_tickets,
        settings.topic_devices,
    ]
    return await ensure_topics(
        access,
        topics=dict.fromkeys(names, settings.topic_partitions),
        compacted={settings.topic_devices},
        configs={settings.topic_deadletter: DEADLETTER_TOPIC_CONFIG},
    )
