"""Settings of the rules service, from `CITYOPS_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from cityops.common.settings import DatabaseSettings, KafkaSettings, MetricsSettings


class RulesSettings(KafkaSettings, DatabaseSettings, MetricsSettings):
    """`cityops rules`: Kafka in, PostgreSQL and `city.tickets.v1` out."""

    kafka_principal: ClassVar[str] = "rules"  # CITYOPS_RULES_KAFKA_USERNAME etc.

    metrics_port: int = Field(default=9102, ge=0, le=65535)
    rules_group: str = Field(default="rules", min_length=1, max_length=200)
    rules_file: Path | None = Field(
        default=None, description="YAML rule file; the shipped cityops/rules/default.yaml if unset"
    )
    # Default location: Amsterdam, Dam square. Only the dusk-dawn schedule (lamp_out) uses it.
    city_lat: float = Field(default=52.3731, ge=-90, le=90)
    city_lon: float = Field(default=4.8926, ge=-180, le=180)
    city_tz: str = "Europe/Amsterdam"
    rules_batch_max: int = Field(default=5000, ge=1, le=100_000, description="records per batch")
    rules_fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    rules_fetch_min_bytes: int = Field(
        default=256 * 1024,
        ge=1,
        le=64 * 1024 * 1024,
        description="The broker answers a fetch once this much is ready, or after the max wait.",
    )
    rules_fetch_max_wait_ms: int = Field(default=20, ge=0, le=10_000)
    rules_registry_refresh_s: float = Field(default=30.0, gt=0, le=3600)
    rules_gauge_refresh_s: float = Field(default=15.0, gt=0, le=3600)
    rules_outbox_sweep_s: float = Field(default=30.0, gt=0, le=3600)
    rules_session_timeout_ms: int = Field(default=30_000, ge=1000, le=300_000)
    rules_commit_interval_ms: int = Field(
        default=1000,
        ge=0,
        le=60_000,
        description="Offsets are committed at most this often (0: after every batch).",
    )

    rules_stall_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="/readyz fails when the consumer loop has not completed a turn for this long.",
    )

    @field_validator("city_tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value
