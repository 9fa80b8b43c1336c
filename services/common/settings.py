"""Settings shared by the services: one pydantic-settings class per service builds on these.

Settings are read from `CITYOPS_*` environment variables in each service's `main()` and passed
down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    instance_id: str = Field(default_factory=default_instance_id)
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=300)


class KafkaSettings(BaseServiceSettings):
    """Kafka connection and topic names (A4)."""

    kafka_bootstrap: str = Field(description="host:port[,host:port...] of the Kafka brokers")
    topic_telemetry: str = "city.telemetry.v1"
    topic_status: str = "city.status.v1"
    topic_deadletter: str = "city.deadletter.v1"
    topic_tickets: str = "city.tickets.v1"
    topic_devices: str = "city.devices.v1"
    topic_partitions: int = Field(default=12, ge=1, le=1000)


class DatabaseSettings(BaseServiceSettings):
    """PostgreSQL connection."""

    database_url: SecretStr = Field(description="postgresql://user:password@host:port/db")
    database_pool_min: int = Field(default=1, ge=0, le=100)
    database_pool_max: int = Field(default=10, ge=1, le=200)


class MetricsSettings(BaseServiceSettings):
    """Where a worker serves /metrics, /healthz and /readyz."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
