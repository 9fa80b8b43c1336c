"""Kafka clients for the services, tools and tests: every one is built here, with credentials.

`KafkaAccess` says where the brokers are and who connects (a SASL principal, or none for a
PLAINTEXT broker); `kafka_producer`, `kafka_consumer` and `kafka_admin` build aiokafka clients
from it, so no client is ever made from only `bootstrap_servers`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from cityops.common.settings import KafkaSettings, principal_env_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaAccess:
    """Where the brokers are and which principal connects (none: PLAINTEXT)."""

    bootstrap: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sasl_mechanism: str = "SCRAM-SHA-512"
    security_protocol: str | None = None
    ssl_cafile: Path | None = None

    @classmethod
    def from_settings(cls, settings: KafkaSettings) -> KafkaAccess:
        """The access a service's settings describe."""
        password = settings.kafka_password
        return cls(
            bootstrap=settings.kafka_bootstrap,
            username=settings.kafka_username,
            password=password.get_secret_value() if password is not None else None,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            security_protocol=settings.kafka_security_protocol,
            ssl_cafile=settings.kafka_ssl_cafile,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, principal: str) -> KafkaAccess:
        """`principal`'s access from `CITYOPS_*` values (the stack's settings file, for tools)."""
        names = principal_env_names(principal)
        return cls(
            bootstrap=env["CITYOPS_KAFKA_BOOTSTRAP"],
            username=env.get(names["kafka_username"]) or None,
            password=env.get(names["kafka_password"]) or None,
            sasl_mechanism=env.get(names["kafka_sasl_mechanism"]) or "SCRAM-SHA-512",
        )

    @property
    def protocol(self) -> str:
        """The security protocol in force: explicit, else SASL_PLAINTEXT with a username."""
        if self.security_protocol:
            return self.security_protocol
        return "SASL_PLAINTEXT" if self.username else "PLAINTEXT"

    def client_options(self) -> dict[str, Any]:
        """aiokafka connection keyword arguments (bootstrap, protocol, SASL, TLS)."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.protocol,
        }
        if self.protocol.startswith("SASL_"):
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        if self.protocol.endswith("SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        return options

    def settings_values(self) -> dict[str, Any]:
        """This access as `KafkaSettings` keyword arguments (a service run by a test or tool)."""
        values: dict[str, Any] = {"kafka_bootstrap": self.bootstrap}
        if self.username:
            values |= {
                "kafka_username": self.username,
                "kafka_password": self.password,
                "kafka_sasl_mechanism": self.sasl_mechanism,
            }
        return values

    def env(self) -> dict[str, str]:
        """This access as `CITYOPS_KAFKA_*` variables (a service started as a subprocess)."""
        return {
            f"CITYOPS_{key.upper()}": str(value) for key, value in self.settings_values().items()
        }


def scratch_topic(name: str, suffix: str) -> str:
    """`city.<name>.v1.<suffix>`: a bench's or tool's own topic, under the A4 name's ACL prefix
    so the services run against it with their own principals."""
    return f"city.{name}.v1.{suffix}"


def kafka_producer(access: KafkaAccess, **options: Any) -> AIOKafkaProducer:
    """An unstarted producer for `access`; `options` are aiokafka's producer options."""
    return AIOKafkaProducer(**access.client_options(), **options)


def kafka_consumer(access: KafkaAccess, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """An unstarted consumer for `access`, subscribed to `topics` if any are given."""
    return AIOKafkaConsumer(*topics, **access.client_options(), **options)


def kafka_admin(access: KafkaAccess, **options: Any) -> AIOKafkaAdminClient:
    """An unstarted admin client for `access`."""
    return AIOKafkaAdminClient(**access.client_options(), **options)


async def ensure_topics(
    access: KafkaAccess,
    *,
    topics: Mapping[str, int],
    compacted: Collection[str] = (),
    configs: Mapping[str, Mapping[str, str]] | None = None,
    replication_factor: int = 1,
) -> list[str]:
    """Create the missing topics (name -> partitions); returns the names created.

    `configs` (name -> topic configs) are set at creation and also on a topic that exists
    already (merged into its other dynamic configs), so a cap added later reaches old
    deployments; a failure to update (e.g. no AlterConfigs permission) is logged, not raised.
    """
    configs = configs or {}
    admin = kafka_admin(access)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs={
                    **({"cleanup.policy": "compact"} if name in compacted else {}),
                    **configs.get(name, {}),
                },
            )
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)
            log.info("created topics", extra={"topics": [t.name for t in missing]})
        to_update = [name for name in configs if name in existing and name in topics]
        if to_update:
            await _set_configs(admin, {name: configs[name] for name in to_update})
        return [t.name for t in missing]
    finally:
        await admin.close()


_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs v1+ config_source: set on the topic itself


async def _set_configs(
    admin: AIOKafkaAdminClient, configs: Mapping[str, Mapping[str, str]]
) -> None:
    """Add `configs` to existing topics, keeping their other dynamic configs; only if needed.

    AlterConfigs replaces a topic's whole dynamic set, so the current one is read first and
    merged; a topic that already has these values is left alone (no write at every start).
    """
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, None) for name in configs]
        )
        updates: dict[str, dict[str, str]] = {}
        for response in described:
            for error_code, error_message, _type, name, entries in response.resources:
                if error_code:
                    log.warning(
                        "could not read the configs of topic %s: %s (error %s)",
                        name,
                        error_message,
                        error_code,
                        extra={"topic": name},
                    )
                    continue
                current = {
                    entry[0]: entry[1]
                    for entry in entries
                    if type(entry[3]) is int and entry[3] == _DYNAMIC_TOPIC_CONFIG
                }
                wanted = {**current, **configs[name]}
                if wanted != current:
                    updates[name] = wanted
        if not updates:
            return
        responses = await admin.alter_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, name, values)
                for name, values in updates.items()
            ]
        )
    except KafkaError as exc:
        log.warning("could not set topic configs: %s", exc, extra={"topics": list(configs)})
        return
    for response in responses:
        for error_code, error_message, _type, name in response.resources:
            if error_code:
                log.warning(
                    "could not set the configs of topic %s: %s (error %s)",
                    name,
                    error_message,
                    error_code,
                    extra={"topic": name},
                )
            else:
                log.info("set topic configs", extra={"topic": name, "configs": updates[name]})


@contextlib.contextmanager
def kcat_args(access: KafkaAccess) -> Iterator[list[str]]:
    """kcat's broker arguments; credentials go in a private temp file (`-F`), not on argv.

    kcat logs in with PLAIN, which the stack gives its admin only: Debian 12's kcat 1.7.1
    (librdkafka 2.0.2) sends a SCRAM proof Kafka 4 rejects (confluentinc/librdkafka#4895,
    fixed in librdkafka 2.6.1; edenhill/kcat#462).
    """
    if not access.protocol.startswith("SASL_"):
        yield ["-b", access.bootstrap]
        return
    lines = {
        "security.protocol": access.protocol.lower(),
        "sasl.mechanisms": "PLAIN",
        "sasl.username": access.username,
        "sasl.password": access.password,
    }
    if access.ssl_cafile:
        lines["ssl.ca.location"] = str(access.ssl_cafile)
    with tempfile.NamedTemporaryFile("w", prefix="cityops-kcat-", suffix=".conf") as config:
        config.write("".join(f"{key}={value}\n" for key, value in lines.items()))
        config.flush()
        yield ["-b", access.bootstrap, "-F", config.name]
