"""Settings of the ingest service (`CITYOPS_*` environment variables)."""

from __future__ import annotations

import socket
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from cityops.common.settings import DatabaseSettings, KafkaSettings, MetricsSettings


class IngestSettings(KafkaSettings, DatabaseSettings, MetricsSettings):
    """Everything `cityops ingest` reads from the environment."""

    kafka_principal: ClassVar[str] = "ingest"  # CITYOPS_INGEST_KAFKA_USERNAME etc.

    metrics_port: int = Field(default=9101, ge=0, le=65535)

    mqtt_url: str = Field(description="mqtt://host:port of the broker")
    ingest_mqtt_username: str = Field(min_length=1, max_length=256)
    ingest_mqtt_password: SecretStr
    ingest_mqtt_protocol: Literal["3.1.1", "5"] = Field(
        default="3.1.1",
        description="Framing of ingest's own connection; 3.1.1 measured faster (docs/ingest.md).",
    )
    ingest_share_group: str = Field(default="ingest", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ingest_replica_index: int = Field(default=0, ge=0, le=9999)
    ingest_client_id: str = Field(
        default="",
        max_length=128,
        description="Stable MQTT client id (persistent session); default ingest-<host>-<replica>.",
    )
    ingest_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=2**32 - 1)
    ingest_keepalive_s: int = Field(default=30, ge=5, le=3600)

    ingest_max_payload_bytes: int = Field(default=4096, ge=64, le=1_048_576)
    ingest_clock_skew_s: float = Field(default=300.0, gt=0, le=86_400)
    ingest_rate_per_s: float = Field(
        default=1.0, gt=0, description="Sustained readings per device per second of sensor time."
    )
    ingest_rate_burst: float = Field(default=60.0, ge=1)
    ingest_deadletter_rate_per_s: float = Field(
        default=0.1, gt=0, description="Rejects copied per device per second, sustained."
    )
    ingest_deadletter_burst: float = Field(
        default=20.0, ge=1, description="Rejects copied per device before the sustained rate."
    )
    ingest_deadletter_prefix_bytes: int = Field(
        default=4096,
        ge=0,
        le=1_048_576,
        description="Longest payload a dead letter copies whole; longer ones keep this prefix.",
    )
    ingest_deadletter_summary_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How often a record counts the rejects suppressed past the budget.",
    )

    ingest_max_in_flight: int = Field(
        default=1000,
        ge=1,
        le=65_535,
        description="Messages received but not yet acknowledged (MQTT 5 Receive Maximum).",
    )
    ingest_kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "lz4"
    ingest_kafka_max_batch_bytes: int = Field(default=262_144, ge=16_384, le=16_777_216)
    ingest_kafka_request_timeout_ms: int = Field(default=30_000, ge=1000, le=600_000)
    ingest_kafka_stall_s: float = Field(
        default=5.0, gt=0, description="/readyz fails when a record waits longer than this."
    )

    ingest_registry_refresh_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="Incremental PostgreSQL refresh; also how long an absent id is remembered.",
    )
    ingest_registry_full_reload_s: float = Field(default=300.0, gt=0, le=86_400)
    ingest_registry_lookup_max_ids: int = Field(
        default=500,
        ge=0,
        le=10_000,
        description="Distinct unknown device ids per PostgreSQL lookup (one per turn); 0: off.",
    )
    ingest_registry_lookup_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="Longest a registry lookup may hold readings."
    )

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
            raise ValueError("expected mqtt://host[:port]")
        return value

    @model_validator(mode="after")
    def _client_id(self) -> IngestSettings:
        if not self.ingest_client_id:
            derived = f"ingest-{socket.gethostname()}-{self.ingest_replica_index}"
            object.__setattr__(self, "ingest_client_id", derived[:128])
        return self

    @property
    def mqtt_host(self) -> str:
        """Broker host name."""
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port(self) -> int:
        """Broker port."""
        return urlsplit(self.mqtt_url).port or 1883
