"""The stack's Kafka as tests reach it: the admin's access for the tests' own clients, and each
service's own principal for the services a test runs (so the broker's ACLs apply to them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cityops.common.kafka import KafkaAccess


@dataclass(frozen=True)
class StackKafka:
    """Kafka principals from `.stack/cityops.env` (none on a PLAINTEXT broker)."""

    env: Mapping[str, str]

    def __repr__(self) -> str:
        return f"StackKafka(bootstrap={self.bootstrap!r})"

    @property
    def bootstrap(self) -> str:
        """`host:port` of the broker."""
        return self.env["CITYOPS_KAFKA_BOOTSTRAP"]

    @property
    def admin(self) -> KafkaAccess:
        """The stack's admin principal: test fixtures create, read and delete with it."""
        return KafkaAccess.from_env(self.env, principal="admin")

    def service(self, name: str) -> KafkaAccess:
        """The principal of service `name` (ingest, rules, api)."""
        return KafkaAccess.from_env(self.env, principal=name)
