"""Settings of `cityops api`: HTTP, database, Kafka, MQTT credentials, retention."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr

from cityops.common.city_metrics import CityMetricsSettings
from cityops.common.kinds import Kind
from cityops.common.settings import DatabaseSettings, KafkaSettings

# How long history is kept per kind when nothing else is configured.
DEFAULT_RETENTION_DAYS: dict[Kind, int] = {
    Kind.STREETLIGHT: 90,
    Kind.MANHOLE: 365,
    Kind.WASTEBIN: 90,
    Kind.PARKING: 30,
}


class ApiSettings(KafkaSettings, DatabaseSettings, CityMetricsSettings):
    """Everything `cityops api` reads from `CITYOPS_*` environment variables."""

    kafka_principal: ClassVar[str] = "api"  # CITYOPS_API_KAFKA_USERNAME etc.

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    api_bootstrap_key: SecretStr | None = Field(
        default=None, description="An admin API key accepted without a database row."
    )
    api_key_cache_s: float = Field(
        default=5.0, ge=0, le=300, description="How long a key lookup is cached (revocation lag)."
    )
    api_key_usage_flush_s: float = Field(
        default=30.0,
        ge=0.05,
        le=3600,
        description="How often a replica writes its keys' last_used_at (one statement).",
    )

    # Read-model projector.
    api_projector_enabled: bool = True
    api_projector_group: str = "api-projector"
    api_projector_batch_max: int = Field(default=5000, ge=1, le=100_000)
    api_projector_write_lanes: int = Field(
        default=2, ge=1, le=16, description="Concurrent batch writers (disjoint partitions)."
    )
    api_projector_fetch_timeout_ms: int = Field(default=500, ge=10, le=60_000)
    api_projector_commit_interval_ms: int = Field(
        default=1000,
        ge=10,
        le=60_000,
        description="How often written offsets are committed (a crash replays at most this).",
    )
    api_projector_stall_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="/readyz fails when the projector has not completed a fetch for this long.",
    )
    api_partitions_ahead_days: int = Field(default=3, ge=1, le=60)
    api_maintenance_interval_s: float = Field(default=3600.0, gt=0, le=86_400)
    api_retention_streetlight_days: int = Field(
        default=DEFAULT_RETENTION_DAYS[Kind.STREETLIGHT], ge=1, le=36_500
    )
    api_retention_manhole_days: int = Field(
        default=DEFAULT_RETENTION_DAYS[Kind.MANHOLE], ge=1, le=36_500
    )
    api_retention_wastebin_days: int = Field(
        default=DEFAULT_RETENTION_DAYS[Kind.WASTEBIN], ge=1, le=36_500
    )
    api_retention_parking_days: int = Field(
        default=DEFAULT_RETENTION_DAYS[Kind.PARKING], ge=1, le=36_500
    )

    # MQTT credentials (the broker's devices file, read by its auth plugin; provisioning.py).
    mqtt_device_password_file: Path | None = Field(
        default=None, description="The devices password file the broker's auth plugin reads."
    )
    mqtt_password_lock_file: Path | None = None
    mqtt_password_iterations: int = Field(default=101, ge=1, le=1_000_000)

    api_summary_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="District summaries are recomputed at most this often per replica.",
    )

    # Outbox of the API's Kafka events (publisher.py).
    api_outbox_sweep_s: float = Field(
        default=10.0, gt=0, le=3600, description="How often the whole outbox is re-published."
    )
    api_outbox_publish_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest wait for Kafka's acks of one batch."
    )

    # Limits.
    api_import_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    api_import_max_rows: int = Field(default=100_000, ge=1, le=1_000_000)
    api_stream_queue_max: int = Field(default=1000, ge=10, le=100_000)
    api_stream_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    api_stream_resume_max: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="Concurrent Last-Event-ID replays per replica (each has a Kafka consumer"
        " until it has caught up); beyond, 503 with Retry-After.",
    )
    api_stream_resume_retry_after_s: int = Field(default=5, ge=1, le=3600)
    api_stream_resume_max_events: int = Field(
        default=200_000,
        ge=1,
        le=10_000_000,
        description="Most records a resume replays (all topics, before filters); a Last-Event-ID"
        " further back gets 410.",
    )
    api_stream_fetch_max_wait_ms: int = Field(
        default=25,
        ge=0,
        le=5000,
        description="How long the stream consumer lets the broker gather records (fewer fetches).",
    )

    def retention_days(self) -> dict[Kind, int]:
        """Days of history kept per kind."""
        return {
            Kind.STREETLIGHT: self.api_retention_streetlight_days,
            Kind.MANHOLE: self.api_retention_manhole_days,
            Kind.WASTEBIN: self.api_retention_wastebin_days,
            Kind.PARKING: self.api_retention_parking_days,
        }
