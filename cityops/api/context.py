"""What request handlers need, built once in main() and reached through `request.app.state`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cityops.api.devices.credentials import CredentialStore
from cityops.api.http.auth import Authenticator, Principal, Scope, bearer_token, require_scope
from cityops.api.http.cache import TtlCache
from cityops.api.metrics import ApiMetrics
from cityops.api.outbox.relay import EventPublisher
from cityops.api.settings import ApiSettings
from cityops.api.stream.broadcaster import Broadcaster

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


@dataclass(slots=True)
class ApiContext:
    """The service's collaborators, shared by every request."""

    settings: ApiSettings
    pool: asyncpg.Pool
    metrics: ApiMetrics
    authenticator: Authenticator
    credentials: CredentialStore
    publisher: EventPublisher
    broadcaster: Broadcaster
    readiness: ReadinessCheck
    summaries: TtlCache[Any]


async def get_context(request: Request) -> ApiContext:
    """The context stored on the app by create_app() (async: no threadpool hop per request)."""
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(get_context)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


def requires(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks `scope` (401, then 403)."""

    async def dependency(
        request: Request,
        context: Context,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        header = request.headers.get("authorization")
        if credentials is None:
            bearer_token(header)  # raises the right 401
        key = bearer_token(header)
        principal = await context.authenticator.authenticate(key)
        require_scope(principal, scope)
        return principal

    return dependency


Reader = Annotated[Principal, Depends(requires(Scope.READ))]
Operator = Annotated[Principal, Depends(requires(Scope.OPERATE))]
Admin = Annotated[Principal, Depends(requires(Scope.ADMIN))]
