"""`/v1/api-keys`: admins create, list and revoke API keys (the key is shown once)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Response

from cityops.api.context import Admin, Context
from cityops.api.http.auth import hash_api_key, new_api_key
from cityops.api.http.problems import Problem
from cityops.api.keys import store as store_keys
from cityops.api.keys.models import ApiKeyCreate, ApiKeyCreated, ApiKeyList

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["api keys"])


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=201, summary="Create a key")
async def create_key(context: Context, principal: Admin, body: ApiKeyCreate) -> dict[str, Any]:
    """A new key with the given scopes; the key itself is only in this response."""
    key = new_api_key()
    row = await store_keys.create_key(
        context.pool, name=body.name, key_hash=hash_api_key(key), scopes=sorted(set(body.scopes))
    )
    if row is None:
        raise Problem(409, f"a key named {body.name!r} exists", problem="exists")
    log.info("api key created", extra={"key_name": body.name, "actor": principal.actor})
    return {**dict(row), "key": key}


@router.get("/api-keys", response_model=ApiKeyList, summary="List keys")
async def list_keys(context: Context, _: Admin) -> dict[str, Any]:
    """Names, scopes and dates of every key (never the keys)."""
    return {"items": [dict(row) for row in await store_keys.list_keys(context.pool)]}


@router.delete("/api-keys/{name}", status_code=204, summary="Revoke a key")
async def revoke_key(context: Context, principal: Admin, name: str) -> Response:
    """Revoke a key; other replicas stop accepting it within the key cache time."""
    if not await store_keys.revoke_key(context.pool, name=name):
        raise Problem(404, f"no key named {name!r}", problem="key-not-found")
    context.authenticator.forget()
    log.info("api key revoked", extra={"key_name": name, "actor": principal.actor})
    return Response(status_code=204)
