"""Request and response models of API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    Field,
)

from cityops.api.http.fields import (
    Input,
)


class ApiKeyCreate(Input):
    """A new API key."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    scopes: list[Literal["read", "operate", "admin"]] = Field(min_length=1, max_length=3)


class ApiKeyOut(BaseModel):
    """An API key's public facts (never the key)."""

    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="Last authenticated use, written by each replica at most every"
        " CITYOPS_API_KEY_USAGE_FLUSH_S (null: never used)."
    )


class ApiKeyCreated(ApiKeyOut):
    """A created key: `key` is shown once and stored only as a hash."""

    key: str


class ApiKeyList(BaseModel):
    """Every API key."""

    items: list[ApiKeyOut]
