"""Settings shared by the services: one pydantic-settings class per service builds on these.

Settings are read from `CITYOPS_*` environment variables in each service's `main()` and passed
down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"]
PRINCIPAL_KEYS = ("username", "password", "sasl_mechanism")


def default_instance_id() -> str:
    """A per-process id: host name and pid, unique across replicas on one machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


class BaseServiceSettings(BaseSettings):
    """Logging and identity, common to every service."""

    model_config = SettingsConfigDict(env_prefix="CITYOPS_", extra="ignore", frozen=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: JSON unless stderr is a terminal."
    )
    log_repeat_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="A repeated warning or error is logged once per interval, with a count.",
    )
    instance_id: str = Field(default_factory=default_instance_id)
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=300)


def principal_env_names(principal: str) -> dict[str, str]:
    """`kafka_username` etc. -> `CITYOPS_<PRINCIPAL>_KAFKA_USERNAME` etc."""
    return {
        f"kafka_{key}": f"CITYOPS_{principal.upper()}_KAFKA_{key.upper()}" for key in PRINCIPAL_KEYS
    }


class _PrincipalEnvSource(PydanticBaseSettingsSource):
    """A service's own `CITYOPS_<SERVICE>_KAFKA_*` credentials, ahead of `CITYOPS_KAFKA_*`.

    One settings file can then hold every service's principal (as `.stack/cityops.env` does)
    while a deployment with one environment per service sets plain `CITYOPS_KAFKA_USERNAME`.
    """

    def __init__(self, settings_cls: type[BaseSettings], principal: str) -> None:
        super().__init__(settings_cls)
        self._names = principal_env_names(principal)

    def get_field_value(
        self,
        field: FieldInfo,  # noqa: ARG002 - abstract in the base; this source answers in __call__
        field_name: str,
    ) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {
            field: os.environ[name] for field, name in self._names.items() if os.environ.get(name)
        }


class KafkaSettings(BaseServiceSettings):
    """Kafka connection, credentials and topic names (A4)."""

    # whose CITYOPS_<PRINCIPAL>_KAFKA_* credentials this service reads first ("" for none)
    kafka_principal: ClassVar[str] = ""

    kafka_bootstrap: str = Field(description="host:port[,host:port...] of the Kafka brokers")
    kafka_username: str | None = Field(
        default=None, min_length=1, max_length=256, description="SASL principal; unset: none"
    )
    kafka_password: SecretStr | None = None
    kafka_sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    kafka_security_protocol: SecurityProtocol | None = Field(
        default=None, description="Unset: SASL_PLAINTEXT with a username, else PLAINTEXT."
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle for SASL_SSL; unset: the system's."
    )
    topic_telemetry: str = "city.telemetry.v1"
    topic_status: str = "city.status.v1"
    topic_deadletter: str = "city.deadletter.v1"
    topic_tickets: str = "city.tickets.v1"
    topic_devices: str = "city.devices.v1"
    topic_partitions: int = Field(default=12, ge=1, le=1000)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the service's own Kafka principal, then `CITYOPS_*` as usual."""
        if not cls.kafka_principal:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        principal = _PrincipalEnvSource(settings_cls, cls.kafka_principal)
        return init_settings, principal, env_settings, dotenv_settings, file_secret_settings


class DatabaseSettings(BaseServiceSettings):
    """PostgreSQL connection."""

    database_url: SecretStr = Field(description="postgresql://user:password@host:port/db")
    database_pool_min: int = Field(default=1, ge=0, le=100)
    database_pool_max: int = Field(default=10, ge=1, le=200)


class MetricsSettings(BaseServiceSettings):
    """Where a worker serves /metrics, /healthz and /readyz."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
