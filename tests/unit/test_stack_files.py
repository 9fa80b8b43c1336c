"""The native stack's checked-in and rendered configuration, checked without servers."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from cityops.stack import kafka, mosquitto, prometheus
from cityops.stack.credentials import StackSecrets, parse_env_file, render_env
from cityops.stack.layout import StackError, StackPaths, repo_root

POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


@pytest.fixture
def paths(tmp_path: Path) -> StackPaths:
    # real deploy/ templates, data under a throw-away repo root
    (tmp_path / "deploy").symlink_to(repo_root() / "deploy")
    return StackPaths(repo=tmp_path)


def test_pom_pins_kafka_4_and_the_log4j2_slf4j_binding() -> None:
    pom = ET.parse(repo_root() / "deploy" / "kafka" / "pom.xml").getroot()
    assert pom.findtext("m:packaging", namespaces=POM_NS) == "pom"
    properties = pom.find("m:properties", POM_NS)
    assert properties is not None
    props = {p.tag.split("}")[1]: p.text for p in properties}
    assert props["kafka.version"] is not None and props["kafka.version"].startswith("4.")
    deps = {
        d.findtext("m:artifactId", namespaces=POM_NS): d.findtext("m:version", namespaces=POM_NS)
        for d in pom.iterfind("m:dependencies/m:dependency", POM_NS)
    }
    assert deps == {
        "kafka_2.13": "${kafka.version}",
        "log4j-core": "${log4j.version}",
        # Kafka 4.1 brings slf4j-api 1.7.x: its log4j2 binding is log4j-slf4j-impl
        "log4j-slf4j-impl": "${log4j.version}",
    }
    assert kafka.DEPENDENCY_PLUGIN.endswith(":3.8.1")


def test_server_properties_single_node_kraft(paths: StackPaths) -> None:
    text = kafka.server_properties(kafka.KafkaLayout(paths), admin_password="pw")
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert settings["process.roles"] == "broker,controller"
    assert settings["node.id"] == "1"
    assert settings["listeners"] == "BROKER://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert settings["group.initial.rebalance.delay.ms"] == "0"
    assert settings["auto.create.topics.enable"] == "false"
    internal = [key for key in settings if key.endswith((".replication.factor", ".min.isr"))]
    assert len(internal) >= 6
    assert all(settings[key] == "1" for key in internal)
    assert settings["log.dirs"] == str(paths.root / "kafka" / "data")


def test_half_formatted_kafka_dir_is_refused(paths: StackPaths) -> None:
    layout = kafka.KafkaLayout(paths)
    layout.data.mkdir(parents=True)
    (layout.data / "__cluster_metadata-0").mkdir()
    with pytest.raises(StackError, match=r"half-formatted.*delete"):
        kafka.ensure_formatted(layout)


def test_mosquitto_conf_rendered(paths: StackPaths) -> None:
    text = mosquitto.render_conf(mosquitto.MosquittoLayout(paths))
    home = paths.root / "mosquitto"
    lines = {line.split(" ", 1)[0]: line for line in text.splitlines() if line[:1].isalpha()}
    assert lines["listener"] == "listener 1883 127.0.0.1"
    assert lines["allow_anonymous"] == "allow_anonymous false"
    # one mechanism: the auth plugin reads the password files; no password_file, no acl_file
    assert "password_file" not in lines
    assert "acl_file" not in lines
    assert lines["plugin"] == f"plugin {home}/cityops_auth.so"
    options = {
        key.removeprefix("plugin_opt_"): line.split(" ", 1)[1]
        for key, line in lines.items()
        if key.startswith("plugin_opt_")
    }
    assert options == {
        "service_password_file": f"{home}/service.passwd",
        "device_password_file": f"{home}/devices.passwd",
        "ingest_user": "ingest",
        "gateway_user": "gateway",
        "dispatcher_user": "dispatcher",
        "reserved_ids": "ingest,gateway,dispatcher,cityops",
        "max_sessions": "3",
        "ingest_share_group": "ingest",
        "ingest_seen_file": f"{home}/data/cityops_ingest_seen",
    }
    assert lines["persistence_location"] == f"persistence_location {home}/data/"
    assert lines["max_packet_size"] == "max_packet_size 262144"  # > 4 KiB: ingest dead-letters


def test_mosquitto_conf_renders_for_a_test_broker_of_its_own(tmp_path: Path) -> None:
    instance = mosquitto.BrokerLayout(
        home=tmp_path / "b", deploy=repo_root() / "deploy", port=18899, max_sessions=5
    )
    text = mosquitto.render_conf(instance)
    assert "listener 18899 127.0.0.1\n" in text
    assert f"plugin_opt_device_password_file {tmp_path}/b/devices.passwd\n" in text
    assert "plugin_opt_max_sessions 5\n" in text
    assert mosquitto.broker_argv(instance) == [
        str(mosquitto.BINARY),
        "-c",
        str(tmp_path / "b" / "mosquitto.conf"),
    ]


def test_prometheus_config_rendered_with_absolute_rules() -> None:
    template = repo_root() / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(prometheus.render_config(template))
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == [str(template.parent / "rules" / "*.yml")]
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert jobs == {
        "prometheus": ["127.0.0.1:9090"],
        "cityops-ingest": ["127.0.0.1:9101"],
        "cityops-rules": ["127.0.0.1:9102"],
        "cityops-api": ["127.0.0.1:8000"],
    }


def test_env_file_is_sourceable_by_bash(paths: StackPaths, tmp_path: Path) -> None:
    secrets = StackSecrets(
        "in-gest_1", "gate-way_2", "su_3", "db-4", "key_5", "graf-6", "disp-7",
        "ka-7", "ki-8", "kr-9", "kp-0",
    )  # fmt: skip
    text = render_env(paths, secrets)
    env_file = tmp_path / "cityops.env"
    env_file.write_text(text)
    parsed = parse_env_file(text)
    assert parsed["CITYOPS_DATABASE_URL"] == "postgresql://cityops:db-4@127.0.0.1:5432/cityops"
    assert parsed["CITYOPS_INGEST_MQTT_PASSWORD"] == "in-gest_1"
    # every service its own Kafka principal; tools and tests the admin's
    assert {
        name: (parsed[f"CITYOPS_{name}_KAFKA_USERNAME"], parsed[f"CITYOPS_{name}_KAFKA_PASSWORD"])
        for name in ("ADMIN", "INGEST", "RULES", "API")
    } == {
        "ADMIN": ("admin", "ka-7"),
        "INGEST": ("ingest", "ki-8"),
        "RULES": ("rules", "kr-9"),
        "API": ("api", "kp-0"),
    }
    assert "CITYOPS_KAFKA_USERNAME" not in parsed  # no service may fall back to someone else's
    assert (
        parsed["CITYOPS_GRAFANA_DATABASE_URL"]
        == "postgresql://cityops_grafana:graf-6@127.0.0.1:5432/cityops"
    )
    shell = subprocess.run(
        ["bash", "-c", f'set -a; source "{env_file}"; env'],
        capture_output=True,
        text=True,
        check=True,
    )
    exported = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    assert {key: exported[key] for key in parsed} == parsed
    assert "secret" not in repr(secrets) and "db-4" not in repr(secrets)
