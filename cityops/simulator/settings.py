"""Settings of the simulator (`CITYOPS_*` environment variables); the fleet shape is CLI flags."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from cityops.common.settings import BaseServiceSettings
from cityops.simulator.city import PLACES, Place


class SimulatorSettings(BaseServiceSettings):
    """Where to publish and where to provision the fleet."""

    mqtt_url: str = Field(description="mqtt://host:port of the broker")
    simulator_mqtt_username: str = Field(default="gateway", min_length=1, max_length=256)
    simulator_mqtt_password: SecretStr | None = Field(
        default=None, description="The gateway account's password (gateway mode)."
    )
    database_url: SecretStr | None = Field(
        default=None, description="Provision straight into the registry when no API URL is set."
    )
    api_url: str | None = Field(
        default=None, description="Provision through the API (POST /v1/devices:import) instead."
    )
    api_key: SecretStr | None = Field(default=None, description="An admin-scoped API key.")
    api_bootstrap_key: SecretStr | None = Field(
        default=None, description="Used when CITYOPS_API_KEY is not set."
    )
    # The same variables as the rules service, so lamp schedules agree; unset: --city decides.
    city_lat: float | None = Field(default=None, ge=-90, le=90)
    city_lon: float | None = Field(default=None, ge=-180, le=180)
    city_tz: str | None = Field(default=None, max_length=64)
    # Direct provisioning writes device credentials the way the API does (the broker's
    # devices file, read by its auth plugin).
    mqtt_device_password_file: Path | None = None
    mqtt_password_lock_file: Path | None = None

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
            raise ValueError("expected mqtt://host[:port]")
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("expected http(s)://host[:port]")
        return value.rstrip("/")

    @property
    def mqtt_host(self) -> str:
        """Broker host name."""
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port(self) -> int:
        """Broker port."""
        return urlsplit(self.mqtt_url).port or 1883

    def place(self) -> Place | None:
        """The city centre from CITYOPS_CITY_LAT/LON/TZ, when both coordinates are set."""
        if self.city_lat is None or self.city_lon is None:
            return None
        for preset in PLACES.values():
            if (preset.lat, preset.lon) == (self.city_lat, self.city_lon):
                return preset
        return Place(
            name=f"{self.city_lat:.4f},{self.city_lon:.4f}",
            lat=self.city_lat,
            lon=self.city_lon,
            timezone=self.city_tz or "UTC",
        )

    def admin_key(self) -> SecretStr | None:
        """The API key to provision with."""
        return self.api_key or self.api_bootstrap_key
