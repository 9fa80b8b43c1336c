"""Key use is noted in memory for stored keys only: no I/O per request."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from cityops.api.http.auth import Authenticator, Principal, effective_scopes, hash_api_key
from cityops.api.http.problems import Problem
from cityops.api.keys.usage import KeyUsage


async def test_only_stored_keys_that_authenticate_are_recorded() -> None:
    known = {hash_api_key("good"): Principal("svc", effective_scopes(["read"]))}

    async def lookup(key_hash: bytes) -> Principal | None:
        return known.get(key_hash)

    used: list[bytes] = []
    auth = Authenticator(lookup=lookup, bootstrap_key="boot", cache_s=5, on_use=used.append)
    await auth.authenticate("boot")  # no row to update
    with pytest.raises(Problem):
        await auth.authenticate("bad")
    assert used == []
    await auth.authenticate("good")
    await auth.authenticate("good")  # a cached lookup is a use too
    assert used == [hash_api_key("good")] * 2


def test_record_keeps_one_entry_per_key_with_the_latest_time() -> None:
    now = [100.0]
    usage = KeyUsage(registry=CollectorRegistry(), flush_s=30, clock=lambda: now[0])
    usage.record(b"a")
    now[0] = 105.0
    usage.record(b"a")
    usage.record(b"b")
    assert usage.pending == 2
