"""API keys: `Authorization: Bearer <key>`, stored as SHA-256, scopes read / operate / admin.

401 when no valid key is presented, 403 when the key lacks the scope. Keys never reach a log:
only the key's name does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from cityops.api.http.problems import Problem

KEY_PREFIX = "cok_"
MAX_KEY_LENGTH = 256
BOOTSTRAP_NAME = "bootstrap"
_CACHE_MAX = 10_000


class Scope(StrEnum):
    """What a key may do; each scope includes the ones below it."""

    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"


_IMPLIES: dict[Scope, frozenset[Scope]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.OPERATE: frozenset({Scope.READ, Scope.OPERATE}),
    Scope.ADMIN: frozenset({Scope.READ, Scope.OPERATE, Scope.ADMIN}),
}


def effective_scopes(scopes: Iterable[str]) -> frozenset[Scope]:
    """The scopes a key holds, with the ones each implies (admin > operate > read)."""
    out: set[Scope] = set()
    for scope in scopes:
        out |= _IMPLIES[Scope(scope)]
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's name and its effective scopes."""

    key_name: str
    scopes: frozenset[Scope]

    @property
    def actor(self) -> str:
        """The audit-log actor for this caller."""
        return f"apikey:{self.key_name}"


def new_api_key() -> str:
    """A fresh random key (shown once, stored only as its hash)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> bytes:
    """SHA-256 of a key: keys are long random strings, so a fast hash is enough."""
    return hashlib.sha256(key.encode()).digest()


def bearer_token(authorization: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` header; 401 problem when absent or odd."""
    challenge = {"WWW-Authenticate": 'Bearer realm="cityops"'}
    if not authorization:
        raise Problem(401, "send an API key as `Authorization: Bearer <key>`", headers=challenge)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "the Authorization header must be `Bearer <key>`", headers=challenge)
    if len(token) > MAX_KEY_LENGTH:
        raise Problem(401, "the API key is not valid", headers=challenge)
    return token


KeyLookup = Callable[[bytes], Awaitable[Principal | None]]


class Authenticator:
    """Resolves keys to principals: the bootstrap key in memory, others by hash, briefly cached."""

    def __init__(
        self,
        *,
        lookup: KeyLookup,
        bootstrap_key: str | None,
        cache_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_use: Callable[[bytes], None] | None = None,
    ) -> None:
        self._lookup = lookup
        # told the hash of every stored key that authenticates (KeyUsage.record: no I/O)
        self._on_use = on_use
        self._bootstrap_hash = hash_api_key(bootstrap_key) if bootstrap_key else None
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}

    async def authenticate(self, key: str) -> Principal:
        """The principal for `key`, or a 401 problem."""
        key_hash = hash_api_key(key)
        if self._bootstrap_hash is not None and hmac.compare_digest(key_hash, self._bootstrap_hash):
            return Principal(BOOTSTRAP_NAME, effective_scopes([Scope.ADMIN]))
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal = await self._lookup(key_hash)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key_hash] = (now + self._cache_s, principal)
        if principal is None:
            raise Problem(
                401,
                "the API key is not valid or was revoked",
                headers={"WWW-Authenticate": 'Bearer realm="cityops", error="invalid_token"'},
            )
        if self._on_use is not None:
            self._on_use(key_hash)
        return principal

    def forget(self) -> None:
        """Drop cached lookups (after a key was revoked by this replica)."""
        self._cache.clear()


def require_scope(principal: Principal, scope: Scope) -> None:
    """403 problem unless the principal holds `scope`."""
    if scope not in principal.scopes:
        raise Problem(
            403,
            f"this API key lacks the `{scope}` scope",
            required_scope=str(scope),
        )
