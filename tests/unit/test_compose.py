"""docker-compose.yml (the container path) agrees with the native stack and the code.

No Docker engine runs on the build machines, so this parses the compose file and checks it
against what exists: settings classes, ports, config files, the Kafka version in the pom.
"""

from __future__ import annotations

import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]

# compose service -> the settings class its process builds in main()
SETTINGS = {
    "ingest": "cityops.ingest.settings:IngestSettings",
    "rules": "cityops.rules.settings:RulesSettings",
    "api": "cityops.api.settings:ApiSettings",
    "simulator": "cityops.simulator.settings:SimulatorSettings",
    "migrate": "cityops.common.migrate:MigrateSettings",
    "mqtt-init": "cityops.common.mqtt_accounts:ServiceAccountSettings",
    "kafka-init": "cityops.stack.kafka_principals:ProvisionSettings",
}

# A9: the same ports on loopback natively and published by compose.
PORTS = {
    "mosquitto": 1883,
    "kafka": 9092,
    "postgres": 5432,
    "prometheus": 9090,
    "api": 8000,
    "ingest": 9101,
    "rules": 9102,
    "grafana": 3000,
}


def settings_class(service: str) -> type[BaseSettings]:
    module, name = SETTINGS[service].split(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseSettings)
    return cls  # type: ignore[no-any-return]


def env_names(cls: type[BaseSettings]) -> dict[str, list[str]]:
    """Field name -> the environment variable names that set it."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: dict[str, list[str]] = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            choices = [alias]
        else:
            choices = [f"{prefix}{field_name}"]
        names[field_name] = [choice.upper() for choice in choices]
    return names


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: use the mapping form of environment"
    return {str(k): str(v) for k, v in env.items()}


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_every_cityops_variable_is_a_real_setting(service: str) -> None:
    known = {name for names in env_names(settings_class(service)).values() for name in names}
    unknown = [n for n in environment(service) if n.startswith("CITYOPS_") and n not in known]
    assert not unknown, f"{service} sets variables its settings do not read: {unknown}"


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_every_required_setting_is_provided(service: str) -> None:
    cls = settings_class(service)
    env = environment(service)
    unmet = [
        names
        for field_name, names in env_names(cls).items()
        if cls.model_fields[field_name].is_required() and not any(n in env for n in names)
    ]
    assert not unmet, f"{service} lacks required settings {unmet}"


@pytest.mark.parametrize(("service", "port"), sorted(PORTS.items()))
def test_published_ports_match_the_native_stack(service: str, port: int) -> None:
    published = SERVICES[service].get("ports", [])
    assert f"127.0.0.1:{port}:{port}" in published, f"{service} should publish {port}"


def test_native_stack_uses_the_same_ports() -> None:
    from cityops.stack import kafka, mosquitto, postgres, prometheus

    assert PORTS["prometheus"] == prometheus.PORT
    assert PORTS["kafka"] == kafka.PORT
    assert PORTS["mosquitto"] == mosquitto.PORT
    assert PORTS["postgres"] == postgres.PORT


def test_bind_mounted_files_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_healthy_dependencies_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck ({name} waits)"
            if spec.get("condition") == "service_completed_successfully":
                assert SERVICES[dep].get("restart") == "no", f"{dep} is one-shot"


def test_services_wait_for_migrations() -> None:
    for name in ("ingest", "rules", "api"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_kafka_image_matches_the_native_broker_version() -> None:
    pom = ET.parse(ROOT / "deploy" / "kafka" / "pom.xml").getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = pom.findtext("m:properties/m:kafka.version", namespaces=ns)
    assert version, "deploy/kafka/pom.xml has no kafka.version property"
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{version}"


def _conf(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text("utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            entries[key] = value
    return entries


def test_mosquitto_configs_share_the_security_and_queue_settings() -> None:
    native = _conf(ROOT / "deploy" / "mosquitto" / "mosquitto.conf")
    compose = _conf(ROOT / "deploy" / "compose" / "mosquitto.conf")
    for key in (
        "allow_anonymous",
        "persistence",
        "max_queued_messages",
        "max_inflight_messages",
        "max_packet_size",
        "persistent_client_expiration",
    ):
        assert compose.get(key) == native.get(key), key
    assert compose["allow_anonymous"] == "false"


def test_prometheus_compose_config_scrapes_every_service() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.compose.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for expected in ("ingest:9101", "rules:9102", "api:8000"):
        assert expected in targets


def test_database_url_points_at_the_compose_database() -> None:
    url = environment("migrate")["CITYOPS_DATABASE_URL"]
    assert re.match(
        r"postgresql://cityops:\$\{CITYOPS_DB_PASSWORD[^}]*\}@postgres:5432/cityops$", url
    )


def test_ingest_keeps_one_client_id_across_container_recreation() -> None:
    # A hostname-derived id changes on every recreate and orphans a persistent session that
    # keeps collecting its share of the readings at the broker.
    service = COMPOSE["services"]["ingest"]
    client_id = environment("ingest").get("CITYOPS_INGEST_CLIENT_ID") or service.get("hostname")
    assert client_id, "set CITYOPS_INGEST_CLIENT_ID (or hostname:) for the ingest service"


def test_compose_broker_is_built_like_the_native_one() -> None:
    from cityops.stack import broker_build

    service = SERVICES["mosquitto"]
    assert service["build"]["dockerfile"] == "deploy/mosquitto/Dockerfile"
    assert service["restart"] == "unless-stopped"
    dockerfile = (ROOT / "deploy" / "mosquitto" / "Dockerfile").read_text("utf-8")
    assert f"MOSQUITTO_DEBIAN_VERSION={broker_build.DEBIAN_VERSION}" in dockerfile
    assert f"make -C src -j2 {' '.join(broker_build.MAKE_FLAGS)} mosquitto" in dockerfile
    assert "COPY deploy/mosquitto/patches/" in dockerfile
    assert "make -C /build/plugin" in dockerfile
    assert "Suites: trixie" in dockerfile and "Types: deb-src" in dockerfile


def test_compose_broker_runs_the_auth_plugin_like_the_native_one() -> None:
    native = _conf(ROOT / "deploy" / "mosquitto" / "mosquitto.conf")
    compose = _conf(ROOT / "deploy" / "compose" / "mosquitto.conf")
    assert "password_file" not in compose and "acl_file" not in compose
    assert compose["plugin"] == "/usr/lib/cityops/cityops_auth.so"
    options = {key for key in native if key.startswith("plugin_opt_")}
    assert options == {key for key in compose if key.startswith("plugin_opt_")}
    assert compose["plugin_opt_device_password_file"] == "/mosquitto/auth/devices.passwd"
    api = environment("api")
    assert api["CITYOPS_MQTT_DEVICE_PASSWORD_FILE"] == compose["plugin_opt_device_password_file"]


def _kafka_env_property(name: str) -> str:
    # apache/kafka maps KAFKA_A_B___C__D to a.b-c_d
    body = name.removeprefix("KAFKA_").lower()
    return body.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")


def test_compose_kafka_has_the_native_stacks_security_settings(tmp_path: Path) -> None:
    from cityops.stack import kafka
    from cityops.stack.layout import StackPaths

    rendered = kafka.server_properties(
        kafka.KafkaLayout(StackPaths(repo=tmp_path)), admin_password="pw"
    )
    native = dict(
        line.split("=", 1) for line in rendered.splitlines() if line and not line.startswith("#")
    )
    compose = {
        _kafka_env_property(k): v for k, v in environment("kafka").items() if k.startswith("KAFKA_")
    }
    security = [
        k for k in native if k.startswith(("sasl.", "listener.", "authorizer", "super", "allow"))
    ]
    assert len(security) >= 10
    for key in security:
        if key.endswith("jaas.config"):
            assert compose[key].split()[:3] == native[key].split()[:3], key
            assert ("CITYOPS_ADMIN_KAFKA_PASSWORD" in compose[key]) == ("pw" in native[key]), key
        else:
            assert compose[key] == native[key], key
    assert compose["inter.broker.listener.name"] == native["inter.broker.listener.name"]


def test_each_service_container_has_its_own_kafka_principal() -> None:
    principals = {
        s: environment(s).get("CITYOPS_KAFKA_USERNAME") for s in ("ingest", "rules", "api")
    }
    assert principals == {"ingest": "ingest", "rules": "rules", "api": "api"}
    for service in ("ingest", "rules", "api"):
        password = environment(service)["CITYOPS_KAFKA_PASSWORD"]
        assert password.startswith(f"${{CITYOPS_{service.upper()}_KAFKA_PASSWORD:?")
        assert SERVICES[service]["depends_on"]["kafka-init"]["condition"] == (
            "service_completed_successfully"
        )
