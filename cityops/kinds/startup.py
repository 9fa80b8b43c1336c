"""The kinds every service loads at start: `CITYOPS_KINDS_DIR`, checked, or exit 2."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cityops.common.service import ConfigError, load_settings
from cityops.kinds.catalog import KindCatalog, load_kinds
from cityops.kinds.spec import KindFileError


class KindsSettings(BaseSettings):
    """Where the kind files are (the same two settings for every service)."""

    model_config = SettingsConfigDict(env_prefix="CITYOPS_", extra="ignore", frozen=True)

    kinds_dir: Path | None = Field(
        default=None, description="folder of <kind>.yaml files; unset: the shipped kinds"
    )
    smart_data_models_dir: Path | None = Field(
        default=None,
        description="folder of Smart Data Model schemas (<Model>/schema.json) to check the "
        "kinds' mapping against; unset: not checked",
    )


def load_configured_kinds() -> KindCatalog:
    """The configured kinds; a bad setting or kind file is a `ConfigError` (one line, exit 2)."""
    settings = load_settings(KindsSettings)
    try:
        return load_kinds(settings.kinds_dir, models_dir=settings.smart_data_models_dir)
    except KindFileError as exc:
        raise ConfigError(f"bad kind file: {exc}") from None
