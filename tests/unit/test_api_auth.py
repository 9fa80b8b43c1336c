"""API keys: bearer parsing, scope hierarchy, 401 vs 403, cached lookups, bootstrap key."""

from __future__ import annotations

import pytest

from cityops.api.http.auth import (
    Authenticator,
    Principal,
    Scope,
    bearer_token,
    effective_scopes,
    hash_api_key,
    new_api_key,
    require_scope,
)
from cityops.api.http.problems import Problem


def test_scopes_include_the_weaker_ones() -> None:
    assert effective_scopes(["read"]) == {Scope.READ}
    assert effective_scopes(["operate"]) == {Scope.READ, Scope.OPERATE}
    assert effective_scopes(["admin"]) == set(Scope)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "x" * 10])
def test_missing_or_malformed_authorization_is_401(header: str | None) -> None:
    with pytest.raises(Problem) as info:
        bearer_token(header)
    assert info.value.status == 401
    assert "WWW-Authenticate" in info.value.headers


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"


def test_missing_scope_is_403() -> None:
    with pytest.raises(Problem) as info:
        require_scope(Principal("k", effective_scopes(["read"])), Scope.OPERATE)
    assert info.value.status == 403
    require_scope(Principal("k", effective_scopes(["operate"])), Scope.READ)


def test_keys_are_random_and_hashed() -> None:
    key = new_api_key()
    assert key.startswith("cok_")
    assert key != new_api_key()
    assert len(hash_api_key(key)) == 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_lookups_are_cached_briefly_and_bootstrap_needs_no_lookup() -> None:
    calls: list[bytes] = []
    known = {hash_api_key("good"): Principal("svc", effective_scopes(["read"]))}

    async def lookup(key_hash: bytes) -> Principal | None:
        calls.append(key_hash)
        return known.get(key_hash)

    clock = FakeClock()
    auth = Authenticator(lookup=lookup, bootstrap_key="boot", cache_s=5, clock=clock)
    assert (await auth.authenticate("boot")).key_name == "bootstrap"
    assert calls == []
    assert (await auth.authenticate("good")).actor == "apikey:svc"
    await auth.authenticate("good")
    assert len(calls) == 1
    with pytest.raises(Problem) as info:
        await auth.authenticate("bad")
    assert info.value.status == 401
    known.clear()  # revoked elsewhere
    clock.now = 6
    with pytest.raises(Problem):
        await auth.authenticate("good")
