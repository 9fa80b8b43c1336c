"""Kafka access: which principal a service's settings pick, and the client options it yields."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.api.settings import ApiSettings
from cityops.common.kafka import KafkaAccess, kafka_consumer, kcat_args
from cityops.rules.settings import RulesSettings


def test_no_username_means_plaintext_and_no_sasl_options() -> None:
    options = KafkaAccess("127.0.0.1:9092").client_options()
    assert options == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}


def test_a_username_means_sasl_with_the_mechanism() -> None:
    access = KafkaAccess("k:9092", username="rules", password="pw", sasl_mechanism="SCRAM-SHA-256")
    assert access.client_options() == {
        "bootstrap_servers": "k:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "rules",
        "sasl_plain_password": "pw",
    }
    assert "pw" not in repr(access)


def test_sasl_ssl_gets_a_tls_context() -> None:
    access = KafkaAccess("k:9093", username="u", password="p", security_protocol="SASL_SSL")
    assert access.client_options()["ssl_context"] is not None


async def test_a_built_consumer_carries_the_credentials() -> None:
    consumer = kafka_consumer(KafkaAccess("k:9092", username="api", password="secret"))
    client = consumer._client  # aiokafka keeps the connection options on its client
    assert (client._security_protocol, client._sasl_plain_username) == ("SASL_PLAINTEXT", "api")


@pytest.fixture
def generic_principal(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A service environment with the generic principal set (and no service's own)."""
    monkeypatch.setenv("CITYOPS_KAFKA_BOOTSTRAP", "k:9092")
    monkeypatch.setenv("CITYOPS_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("CITYOPS_KAFKA_USERNAME", "generic")
    monkeypatch.setenv("CITYOPS_KAFKA_PASSWORD", "generic-pw")
    for name in ("INGEST", "RULES", "API"):
        for key in ("USERNAME", "PASSWORD"):
            monkeypatch.delenv(f"CITYOPS_{name}_KAFKA_{key}", raising=False)
    return monkeypatch


def test_a_service_reads_its_own_principal_before_the_generic_one(
    generic_principal: pytest.MonkeyPatch,
) -> None:
    monkeypatch = generic_principal
    monkeypatch.setenv("CITYOPS_RULES_KAFKA_USERNAME", "rules")
    monkeypatch.setenv("CITYOPS_RULES_KAFKA_PASSWORD", "rules-pw")
    monkeypatch.setenv("CITYOPS_API_KAFKA_USERNAME", "api")
    monkeypatch.setenv("CITYOPS_API_KAFKA_PASSWORD", "api-pw")

    rules = KafkaAccess.from_settings(RulesSettings())
    assert (rules.username, rules.password) == ("rules", "rules-pw")
    api = KafkaAccess.from_settings(ApiSettings())
    assert (api.username, api.password) == ("api", "api-pw")
    # an explicit argument still wins over both
    explicit = RulesSettings(kafka_username="other", kafka_password="x")
    assert KafkaAccess.from_settings(explicit).username == "other"


@pytest.mark.usefixtures("generic_principal")
def test_without_its_own_principal_a_service_uses_the_generic_one() -> None:
    access = KafkaAccess.from_settings(RulesSettings())
    assert (access.username, access.password, access.protocol) == (
        "generic",
        "generic-pw",
        "SASL_PLAINTEXT",
    )


def test_from_env_and_back_round_trips_a_principal() -> None:
    env = {
        "CITYOPS_KAFKA_BOOTSTRAP": "k:9092",
        "CITYOPS_ADMIN_KAFKA_USERNAME": "admin",
        "CITYOPS_ADMIN_KAFKA_PASSWORD": "pw",
        "CITYOPS_ADMIN_KAFKA_SASL_MECHANISM": "PLAIN",
    }
    admin = KafkaAccess.from_env(env, principal="admin")
    assert (admin.username, admin.sasl_mechanism) == ("admin", "PLAIN")
    assert admin.env() == {
        "CITYOPS_KAFKA_BOOTSTRAP": "k:9092",
        "CITYOPS_KAFKA_USERNAME": "admin",
        "CITYOPS_KAFKA_PASSWORD": "pw",
        "CITYOPS_KAFKA_SASL_MECHANISM": "PLAIN",
    }
    assert KafkaAccess.from_env(env, principal="rules").protocol == "PLAINTEXT"


def test_kcat_gets_credentials_through_a_private_file_not_argv() -> None:
    access = KafkaAccess("k:9092", username="admin", password="s3cret")
    with kcat_args(access) as args:
        assert "s3cret" not in " ".join(args)
        config = Path(args[args.index("-F") + 1])
        assert config.stat().st_mode & 0o077 == 0
        text = config.read_text()
        assert "sasl.password=s3cret" in text and "security.protocol=sasl_plaintext" in text
        assert "sasl.mechanisms=PLAIN" in text  # Debian's kcat cannot do SCRAM with Kafka 4
    assert not config.exists()
    with kcat_args(KafkaAccess("k:9092")) as plain:
        assert plain == ["-b", "k:9092"]
