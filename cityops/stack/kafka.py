"""Kafka broker from Maven Central jars: resolve libs, write config, format KRaft storage once."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from cityops.common.kafka import KafkaAccess
from cityops.common.settings import KafkaSettings
from cityops.stack.credentials import StackSecrets
from cityops.stack.kafka_principals import Topics, ensure_a4_topics, provision
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


ADMIN_USER = "admin"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"


class KafkaLayout:
    """Paths under `.stack/kafka` (or under `home` for a broker of its own)."""

    def __init__(self, paths: StackPaths, home: Path | None = None) -> None:
        self.home = home or paths.root / "kafka"
        self.libs = paths.root / "kafka" / "libs"  # a broker of its own runs the stack's jars
        self.stamp = self.libs / ".pom.sha256"
        self.data = self.home / "data"
        self.logs = self.home / "logs"
        self.server_properties = self.home / "server.properties"
        self.log4j2 = self.home / "log4j2.properties"
        self.cluster_id_file = self.home / "cluster.id"
        self.pom = paths.deploy / "kafka" / "pom.xml"


def _plain_jaas(admin_password: str) -> str:
    # the broker's own connections (to itself, to the controller) log in as the admin, and the
    # admin is the only PLAIN user: services authenticate with SCRAM credentials only
    return (
        f'{_PLAIN_MODULE} required username="{ADMIN_USER}" password="{admin_password}" '
        f'user_{ADMIN_USER}="{admin_password}";'
    )


def server_properties(
    layout: KafkaLayout,
    *,
    admin_password: str,
    port: int = PORT,
    controller_port: int = CONTROLLER_PORT,
) -> str:
    """Single-node KRaft (broker + controller) on loopback; SASL everywhere, ACLs enforced.

    No listener takes an unauthenticated client: the broker listener offers SCRAM-SHA-512 (the
    services) and PLAIN (the stack's admin only); the controller listener PLAIN (KRaft cannot
    use SCRAM there: the credentials live in the metadata it serves). StandardAuthorizer with
    no ACL means no access; the admin is the super user.
    """
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"BROKER://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"BROKER://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "BROKER",
        "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,BROKER:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.broker.plain.sasl.jaas.config": _plain_jaas(admin_password),
        "listener.name.broker.scram-sha-512.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": _plain_jaas(admin_password),
        "authorizer.class.name": AUTHORIZER,
        "super.users": f"User:{ADMIN_USER}",
        "allow.everyone.if.no.acl.found": "false",
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
        # Restart after a crash (docs/stack.md, "Kafka recovery"): the restarted node waits for
        # its dead self's broker session to expire before it can register (9 s by default),
        # and loads every partition's log, 2 at a time by default.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "3000",
        "num.recovery.threads.per.data.dir": "4",
    }
    header = "# written by `cityops stack up`; edit cityops/stack/kafka.py, not this file\n"
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


def write_config(
    layout: KafkaLayout, *, admin_password: str, port: int, controller_port: int
) -> bool:
    """server.properties (0600: it holds the admin's password) and log4j2; True if changed."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    text = server_properties(
        layout, admin_password=admin_password, port=port, controller_port=controller_port
    )
    changed = write_if_changed(layout.server_properties, text, mode=0o600)
    changed |= write_if_changed(layout.log4j2, LOG4J2_PROPERTIES)
    return changed


def prepare(paths: StackPaths, stack_secrets: StackSecrets) -> bool:
    """Libs, config and storage; returns whether the broker config changed on disk."""
    layout = KafkaLayout(paths)
    ensure_libs(layout)
    changed = write_config(
        layout,
        admin_password=stack_secrets.kafka_admin_password,
        port=PORT,
        controller_port=CONTROLLER_PORT,
    )
    ensure_formatted(layout)
    return changed


def spec(
    paths: StackPaths,
    layout: KafkaLayout | None = None,
    *,
    name: str = "kafka",
    ports: tuple[int, int] = (PORT, CONTROLLER_PORT),
) -> ServerSpec:
    """How to run the broker (what bin/kafka-server-start.sh does, with a 512 MB heap)."""
    layout = layout or KafkaLayout(paths)
    return ServerSpec(
        name=name,
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
        ports=ports,
        cwd=layout.home,
        stop_timeout_s=60.0,
    )


def admin_access(stack_secrets: StackSecrets, *, port: int = PORT) -> KafkaAccess:
    """The stack's admin (PLAIN, a super user) as the stack itself logs in: it exists before
    any SCRAM credential does, so it probes the broker and provisions the principals."""
    return KafkaAccess(
        f"127.0.0.1:{port}",
        username=ADMIN_USER,
        password=stack_secrets.kafka_admin_password,
        sasl_mechanism="PLAIN",
    )


def scram_passwords(stack_secrets: StackSecrets) -> dict[str, str]:
    """Each SCRAM principal's password: the services', and the admin's for tools and tests."""
    return {
        ADMIN_USER: stack_secrets.kafka_admin_password,
        "ingest": stack_secrets.kafka_ingest_password,
        "rules": stack_secrets.kafka_rules_password,
        "api": stack_secrets.kafka_api_password,
    }


def default_topics() -> Topics:
    """The A4 topic names (CITYOPS_TOPIC_* or their defaults)."""
    return Topics.of(KafkaSettings(kafka_bootstrap=BOOTSTRAP))


async def ensure_default_topics(access: KafkaAccess) -> list[str]:
    """Create the A4 topics (names from CITYOPS_TOPIC_* or their defaults); returns new ones."""
    partitions = KafkaSettings(kafka_bootstrap=access.bootstrap).topic_partitions
    return await ensure_a4_topics(access, topics=default_topics(), partitions=partitions)


async def ensure_access(stack_secrets: StackSecrets, *, port: int = PORT) -> list[str]:
    """Principals, ACLs and the A4 topics, by the admin; returns the topics created."""
    access = admin_access(stack_secrets, port=port)
    await provision(access, passwords=scram_passwords(stack_secrets), topics=default_topics())
    return await ensure_default_topics(access)
