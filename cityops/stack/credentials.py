"""Generated secrets (`.stack/secrets.env`) and the settings file (`.stack/cityops.env`)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cityops.common.topics import RESERVED_DEVICE_IDS
from cityops.stack.layout import StackError, StackPaths

SECRET_KEYS = (
    "MQTT_INGEST_PASSWORD",
    "MQTT_GATEWAY_PASSWORD",
    "POSTGRES_SUPERUSER_PASSWORD",
    "POSTGRES_CITYOPS_PASSWORD",
    "API_BOOTSTRAP_KEY",
    "POSTGRES_GRAFANA_PASSWORD",
    "MQTT_DISPATCHER_PASSWORD",
    "KAFKA_ADMIN_PASSWORD",
    "KAFKA_INGEST_PASSWORD",
    "KAFKA_RULES_PASSWORD",
    "KAFKA_API_PASSWORD",
)
INGEST_USER = "ingest"
GATEWAY_USER = "gateway"
DISPATCHER_USER = "dispatcher"
# never device ids: the service accounts, and prefixes of the services' client ids
RESERVED_MQTT_IDS = RESERVED_DEVICE_IDS
DB_ROLE = "cityops"
DB_NAME = "cityops"
GRAFANA_ROLE = "cityops_grafana"


@dataclass(frozen=True)
class StackSecrets:
    """Passwords generated once per `.stack`; never printed."""

    mqtt_ingest_password: str
    mqtt_gateway_password: str
    postgres_superuser_password: str
    postgres_cityops_password: str
    api_bootstrap_key: str
    postgres_grafana_password: str
    mqtt_dispatcher_password: str
    kafka_admin_password: str
    kafka_ingest_password: str
    kafka_rules_password: str
    kafka_api_password: str

    def __repr__(self) -> str:
        return "StackSecrets(<hidden>)"


def parse_env_file(text: str) -> dict[str, str]:
    """Parse `KEY=value` lines (blank lines and `#` comments skipped, no quoting)."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def _from_values(values: dict[str, str]) -> StackSecrets:
    return StackSecrets(
        mqtt_ingest_password=values["MQTT_INGEST_PASSWORD"],
        mqtt_gateway_password=values["MQTT_GATEWAY_PASSWORD"],
        postgres_superuser_password=values["POSTGRES_SUPERUSER_PASSWORD"],
        postgres_cityops_password=values["POSTGRES_CITYOPS_PASSWORD"],
        api_bootstrap_key=values["API_BOOTSTRAP_KEY"],
        postgres_grafana_password=values["POSTGRES_GRAFANA_PASSWORD"],
        mqtt_dispatcher_password=values["MQTT_DISPATCHER_PASSWORD"],
        kafka_admin_password=values["KAFKA_ADMIN_PASSWORD"],
        kafka_ingest_password=values["KAFKA_INGEST_PASSWORD"],
        kafka_rules_password=values["KAFKA_RULES_PASSWORD"],
        kafka_api_password=values["KAFKA_API_PASSWORD"],
    )


def load_secrets(paths: StackPaths) -> StackSecrets | None:
    """Read `.stack/secrets.env` without changing it; None when it is missing or incomplete."""
    path = paths.secrets_file
    if not path.exists():
        return None
    values = parse_env_file(path.read_text(encoding="utf-8"))
    if any(not values.get(key) for key in SECRET_KEYS):
        return None
    return _from_values(values)


def load_or_create_secrets(paths: StackPaths) -> StackSecrets:
    """Read `.stack/secrets.env`, generating (and saving) any secret that is missing."""
    path = paths.secrets_file
    values = parse_env_file(path.read_text(encoding="utf-8")) if path.exists() else {}
    missing = [key for key in SECRET_KEYS if not values.get(key)]
    if missing:
        # url-safe alphabet: fits in URLs, env files and SQL literals without quoting
        values.update({key: secrets.token_urlsafe(24) for key in missing})
        body = "".join(f"{key}={values[key]}\n" for key in SECRET_KEYS)
        _write_private(path, "# generated once by `cityops stack up`; keep private\n" + body)
    return _from_values(values)


def database_url(stack_secrets: StackSecrets, *, database: str = DB_NAME) -> str:
    """The `cityops` role's URL for `database`."""
    return f"postgresql://{DB_ROLE}:{stack_secrets.postgres_cityops_password}@127.0.0.1:5432/{database}"


def grafana_url(stack_secrets: StackSecrets) -> str:
    """The dashboards' read-only role's URL for the `cityops` database."""
    password = stack_secrets.postgres_grafana_password
    return f"postgresql://{GRAFANA_ROLE}:{password}@127.0.0.1:5432/{DB_NAME}"


def superuser_url(stack_secrets: StackSecrets) -> str:
    """The `postgres` superuser's URL (stack internal: creating the role and database)."""
    return (
        f"postgresql://postgres:{stack_secrets.postgres_superuser_password}@127.0.0.1:5432/postgres"
    )


def _kafka_principal(name: str, password: str) -> dict[str, str]:
    prefix = f"CITYOPS_{name.upper()}_KAFKA_"
    return {
        f"{prefix}USERNAME": name,
        f"{prefix}PASSWORD": password,
        f"{prefix}SASL_MECHANISM": "SCRAM-SHA-512",
    }


def render_env(paths: StackPaths, stack_secrets: StackSecrets) -> str:
    """The `.stack/cityops.env` content: every `CITYOPS_*` setting the stack knows."""
    mqtt_dir = paths.root / "mosquitto"
    settings = {
        "CITYOPS_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
        "CITYOPS_MQTT_URL": "mqtt://127.0.0.1:1883",
        "CITYOPS_DATABASE_URL": database_url(stack_secrets),
        "CITYOPS_GRAFANA_DATABASE_URL": grafana_url(stack_secrets),
        "CITYOPS_PROMETHEUS_URL": "http://127.0.0.1:9090",
        "CITYOPS_INGEST_MQTT_USERNAME": INGEST_USER,
        "CITYOPS_INGEST_MQTT_PASSWORD": stack_secrets.mqtt_ingest_password,
        "CITYOPS_SIMULATOR_MQTT_USERNAME": GATEWAY_USER,
        "CITYOPS_SIMULATOR_MQTT_PASSWORD": stack_secrets.mqtt_gateway_password,
        "CITYOPS_DISPATCHER_MQTT_USERNAME": DISPATCHER_USER,
        "CITYOPS_DISPATCHER_MQTT_PASSWORD": stack_secrets.mqtt_dispatcher_password,
        # the devices file the broker's auth plugin reads (the API writes it) and its lock
        "CITYOPS_MQTT_DEVICE_PASSWORD_FILE": str(mqtt_dir / "devices.passwd"),
        "CITYOPS_MQTT_PASSWORD_LOCK_FILE": str(mqtt_dir / "passwd.lock"),
        "CITYOPS_API_BOOTSTRAP_KEY": stack_secrets.api_bootstrap_key,
        # Kafka SCRAM principals: each service reads its own CITYOPS_<SERVICE>_KAFKA_*; tools
        # and tests use the admin's (a super user)
        **_kafka_principal("admin", stack_secrets.kafka_admin_password),
        **_kafka_principal("ingest", stack_secrets.kafka_ingest_password),
        **_kafka_principal("rules", stack_secrets.kafka_rules_password),
        **_kafka_principal("api", stack_secrets.kafka_api_password),
    }
    for key, value in settings.items():
        if any(c in value for c in " \t\n'\"$`\\"):
            raise StackError(f"{key} contains characters a sourceable env file cannot hold")
    header = "# written by `cityops stack up`; `set -a; source <this file>; set +a`\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def write_env(paths: StackPaths, stack_secrets: StackSecrets) -> None:
    """Write `.stack/cityops.env` (mode 0600) when its content changed."""
    text = render_env(paths, stack_secrets)
    path = paths.env_file
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        _write_private(path, text)
