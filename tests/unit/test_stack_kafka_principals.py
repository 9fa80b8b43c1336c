"""Who may do what on Kafka: the ACL table, and the SCRAM credential the stack sends."""

from __future__ import annotations

import asyncio

from aiokafka.conn import ScramAuthenticator

from cityops.stack.kafka_principals import (
    AlterScramRequest,
    Grant,
    Operation,
    Resource,
    Topics,
    acl_bindings,
    salted_password,
    service_grants,
)

GRANTS = service_grants(Topics())


def _who(operation: Operation, resource: Resource, name: str) -> set[str]:
    return {
        user
        for user, grants in GRANTS.items()
        for grant in grants
        if grant.resource is resource and grant.prefix == name and operation in grant.operations
    }


def test_only_ingest_writes_telemetry_and_status() -> None:
    assert _who(Operation.WRITE, Resource.TOPIC, "city.telemetry.v1") == {"ingest"}
    assert _who(Operation.WRITE, Resource.TOPIC, "city.status.v1") == {"ingest"}


def test_tickets_by_rules_and_the_api_outbox_devices_by_the_api_alone() -> None:
    assert _who(Operation.WRITE, Resource.TOPIC, "city.tickets.v1") == {"rules", "api"}
    assert _who(Operation.WRITE, Resource.TOPIC, "city.devices.v1") == {"api"}


def test_every_consumer_that_sets_records_aside_may_write_dead_letters() -> None:
    assert _who(Operation.WRITE, Resource.TOPIC, "city.deadletter.v1") == {"ingest", "rules", "api"}
    assert _who(Operation.READ, Resource.TOPIC, "city.deadletter.v1") == set()


def test_each_group_is_its_services_alone() -> None:
    assert _who(Operation.READ, Resource.GROUP, "rules") == {"rules"}
    assert _who(Operation.READ, Resource.GROUP, "api-projector") == {"api"}
    assert _who(Operation.READ, Resource.TOPIC, "city.devices.v1") == {"ingest", "api"}


def test_bindings_are_prefixed_allows_for_the_user_principal() -> None:
    grant = Grant(Resource.TOPIC, "city.tickets.v1", (Operation.WRITE, Operation.DESCRIBE))
    assert acl_bindings({"rules": [grant]}) == [
        (2, "city.tickets.v1", 4, "User:rules", "*", 4, 3),
        (2, "city.tickets.v1", 4, "User:rules", "*", 8, 3),
    ]


def test_the_salted_password_is_what_a_scram_client_derives() -> None:
    salt = b"0123456789abcdef"
    client = ScramAuthenticator(
        loop=asyncio.new_event_loop(),
        sasl_plain_password="s3cret",
        sasl_plain_username="ingest",
        sasl_mechanism="SCRAM-SHA-512",
    )
    client.create_salted_password(salt, 8192)
    assert salted_password("s3cret", salt, 8192) == client._salted_password


def test_each_upsert_gets_a_fresh_salt_and_never_the_password() -> None:
    struct = AlterScramRequest({"ingest": "pw-1", "rules": "pw-1"}).build(
        AlterScramRequest._CLASSES[0]
    )
    upserts = struct.upsertions
    assert [u[0] for u in upserts] == ["ingest", "rules"]
    assert upserts[0][3] != upserts[1][3]  # salts differ
    assert all(b"pw-1" not in u[4] and u[2] >= 4096 for u in upserts)
