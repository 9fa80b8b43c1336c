"""Kafka principals and ACLs: one SCRAM principal per service, each allowed only what it does.

The stack's admin (PLAIN, defined in the broker's JAAS config, a super user) creates the
services' SCRAM-SHA-512 credentials (AlterUserScramCredentials) and their ACLs (CreateAcls,
StandardAuthorizer) after the broker answers; both requests are idempotent, so `stack up` sends
them every time. aiokafka has no admin call for either (0.14), so the two requests are built
here from aiokafka's protocol types and sent through its admin client's connection.

Every topic and group is a PREFIXED pattern on the A4 name: `city.telemetry.v1` also covers
`city.telemetry.v1.<suffix>`, the per-test and per-bench topics, so the services run with their
own principals everywhere, not only in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import CreateAclsRequest_v1
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)
from pydantic import SecretStr

from cityops.common.kafka import KafkaAccess, ensure_topics, kafka_admin
from cityops.common.logs import configure_logging
from cityops.common.settings import KafkaSettings
from cityops.common.topics import DEADLETTER_TOPIC_CONFIG

log = logging.getLogger(__name__)

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192  # Kafka accepts 4096..16384
_SCRAM_SHA_512 = 2  # ScramMechanism id in the protocol


class Resource(IntEnum):
    """AclResourceType."""

    TOPIC = 2
    GROUP = 3


class Operation(IntEnum):
    """AclOperation."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


_PREFIXED = 4  # PatternType
_ALLOW = 3  # AclPermissionType


@dataclass(frozen=True)
class Grant:
    """`operations` on every topic or group whose name starts with `prefix`."""

    resource: Resource
    prefix: str
    operations: tuple[Operation, ...]


@dataclass(frozen=True)
class Topics:
    """The A4 topic names the grants are made on (the stack's `CITYOPS_TOPIC_*` values)."""

    telemetry: str = "city.telemetry.v1"
    status: str = "city.status.v1"
    deadletter: str = "city.deadletter.v1"
    tickets: str = "city.tickets.v1"
    devices: str = "city.devices.v1"

    @classmethod
    def of(cls, settings: KafkaSettings) -> Topics:
        """The names `settings` give (CITYOPS_TOPIC_* or their defaults)."""
        return cls(
            telemetry=settings.topic_telemetry,
            status=settings.topic_status,
            deadletter=settings.topic_deadletter,
            tickets=settings.topic_tickets,
            devices=settings.topic_devices,
        )


def _topics(names: Iterable[str], *operations: Operation) -> list[Grant]:
    return [Grant(Resource.TOPIC, name, (*operations, Operation.DESCRIBE)) for name in names]


def service_grants(topics: Topics) -> dict[str, list[Grant]]:
    """What each service principal may do (A4 in docs/ARCHITECTURE.md says why).

    ingest alone writes telemetry and status; rules and the API's outbox write tickets; the API
    writes the devices topic; every consumer that sets a record aside writes dead letters. A
    service may create the topics it creates today at start (a no-op once the stack has).
    """
    read, write, create = Operation.READ, Operation.WRITE, Operation.CREATE
    # ingest and the API check the dead-letter topic's size cap at start (ensure_topics); the
    # admin sets it (`stack up`, kafka-init), so they may read topic configs, never alter them
    capped = Operation.DESCRIBE_CONFIGS
    return {
        "ingest": [
            *_topics((topics.telemetry, topics.status), write, create),
            *_topics((topics.deadletter,), write, create, capped),
            *_topics((topics.devices,), read),
        ],
        "rules": [
            *_topics((topics.telemetry, topics.status), read, create),
            *_topics((topics.tickets, topics.deadletter), write, create),
            Grant(Resource.GROUP, "rules", (read,)),
        ],
        "api": [
            *_topics((topics.telemetry, topics.status), read, create),
            *_topics((topics.tickets, topics.devices), read, write, create),
            *_topics((topics.deadletter,), write, create, capped),
            Grant(Resource.GROUP, "api-projector", (read,)),
        ],
    }


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SCRAM's SaltedPassword: Hi(password, salt, i) of RFC 5802, i.e. PBKDF2-HMAC-SHA-512."""
    return hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)


class _AlterScramResponse(Response):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramStruct(RequestStruct):  # type: ignore[misc]  # aiokafka is untyped
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class AlterScramRequest(Request[_AlterScramStruct]):  # type: ignore[misc]  # untyped base
    """AlterUserScramCredentials v0: upsert SCRAM-SHA-512 credentials."""

    API_KEY: ClassVar[int] = 51

    def __init__(self, passwords: Mapping[str, str], *, iterations: int = SCRAM_ITERATIONS) -> None:
        self._upsertions: list[tuple[str, int, int, bytes, bytes, dict[int, bytes]]] = []
        for name, password in passwords.items():
            salt = secrets.token_bytes(32)
            hashed = salted_password(password, salt, iterations)
            self._upsertions.append((name, _SCRAM_SHA_512, iterations, salt, hashed, {}))

    def build(self, request_struct_class: type[_AlterScramStruct]) -> _AlterScramStruct:
        return request_struct_class([], self._upsertions, {})


class _CreateAclsV1(Request[CreateAclsRequest_v1]):  # type: ignore[misc]  # untyped base
    """CreateAcls v1 with every binding in one request (aiokafka's sends one per request)."""

    API_KEY: ClassVar[int] = 30

    def __init__(self, bindings: list[tuple[int, str, int, str, str, int, int]]) -> None:
        self._bindings = bindings

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self._bindings)


def acl_bindings(
    grants: Mapping[str, Iterable[Grant]],
) -> list[tuple[int, str, int, str, str, int, int]]:
    """CreateAcls v1 creations: (type, name, pattern, principal, host, operation, permission)."""
    return [
        (grant.resource, grant.prefix, _PREFIXED, f"User:{user}", "*", operation, _ALLOW)
        for user, user_grants in grants.items()
        for grant in user_grants
        for operation in grant.operations
    ]


class ProvisionError(RuntimeError):
    """The broker refused a credential or an ACL."""


async def provision(
    admin_access: KafkaAccess, *, passwords: Mapping[str, str], topics: Topics
) -> int:
    """Upsert each principal's SCRAM credential and a service's ACLs; returns the ACLs sent.

    `passwords` may name the admin too: it then has a SCRAM credential beside its PLAIN one
    (tools and tests use SCRAM; PLAIN only bootstraps this call and the broker's own links).
    """
    grants = service_grants(topics)
    bindings = acl_bindings({name: grants[name] for name in passwords if name in grants})
    admin = kafka_admin(admin_access, request_timeout_ms=15_000)
    await admin.start()
    try:
        # private API: aiokafka has no call for either request (see the module doc)
        scram = await admin._send_request(AlterScramRequest(passwords))
        for user, code, message, _tags in scram.results:
            if code:
                raise ProvisionError(
                    f"SCRAM credential for {user}: {for_code(code).__name__}: {message}"
                )
        acls = await admin._send_request(_CreateAclsV1(bindings))
        for code, message in acls.creation_responses:
            if code:
                raise ProvisionError(f"ACL: {for_code(code).__name__}: {message}")
    finally:
        await admin.close()
    log.info(
        "kafka principals provisioned",
        extra={"principals": sorted(passwords), "acls": len(bindings)},
    )
    return len(bindings)


class ProvisionSettings(KafkaSettings):
    """`python -m cityops.stack.kafka_principals` (compose's kafka-init): who to create."""

    admin_kafka_password: SecretStr
    ingest_kafka_password: SecretStr
    rules_kafka_password: SecretStr
    api_kafka_password: SecretStr


async def provision_from(settings: ProvisionSettings) -> None:
    """Principals, ACLs and the A4 topics, as the admin (PLAIN) logs in."""
    admin = settings.admin_kafka_password.get_secret_value()
    access = KafkaAccess(
        settings.kafka_bootstrap, username="admin", password=admin, sasl_mechanism="PLAIN"
    )
    topics = Topics.of(settings)
    passwords = {
        "admin": admin,
        "ingest": settings.ingest_kafka_password.get_secret_value(),
        "rules": settings.rules_kafka_password.get_secret_value(),
        "api": settings.api_kafka_password.get_secret_value(),
    }
    await provision(access, passwords=passwords, topics=topics)
    await ensure_a4_topics(access, topics=topics, partitions=settings.topic_partitions)


async def ensure_a4_topics(access: KafkaAccess, *, topics: Topics, partitions: int) -> list[str]:
    """Create the missing A4 topics (the devices topic compacted); returns the names created."""
    names = [topics.telemetry, topics.status, topics.deadletter, topics.tickets, topics.devices]
    return await ensure_topics(
        access,
        topics=dict.fromkeys(names, partitions),
        compacted={topics.devices},
        configs={topics.deadletter: DEADLETTER_TOPIC_CONFIG},
    )


def main() -> None:
    """Principals, ACLs and topics from `CITYOPS_*`; exit 1 with the reason if refused."""
    configure_logging(service="kafka-init", instance_id="kafka-init")
    try:
        asyncio.run(provision_from(ProvisionSettings()))
    except (ProvisionError, KafkaError, OSError) as exc:
        log.error("kafka principals not provisioned: %s", exc)  # noqa: TRY400 - the reason is it
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
