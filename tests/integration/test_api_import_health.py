"""A 100k-row import does not stall the API: /healthz keeps answering while it is parsed.

`cityops api` runs as a process of its own; the test uploads 100,000 bad JSON-lines rows
(each refused with its reason) and probes /healthz meanwhile. Issue 12 row 8: on 0020c77 the
parsing ran on the event loop and /healthz went unanswered for 1.9 s here (11 s in the issue);
now p50 ~8 ms, max 27-165 ms under load 2-3 (GIL hand-offs to the parsing thread).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.api_support import ApiCase, api_process

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
log = logging.getLogger(__name__)

ROWS = 100_000
# Generous for a loaded 2-core machine (measured: gaps of 0.05-0.2 s); with the parsing on the
# event loop (0020c77) the gap was 1.9 s here, 11 s in the issue.
MAX_HEALTH_GAP_S = 1.0


def bad_rows(count: int) -> bytes:
    """JSON lines whose device ids break the id pattern (each row a validation error)."""
    return b"".join(
        b'{"device_id": "bad id %d", "kind": "wastebin", "district": "north"}\n' % i
        for i in range(count)
    )


async def test_health_keeps_answering_during_a_100k_row_bad_import(
    api_case: ApiCase, tmp_path: Path
) -> None:
    body = bad_rows(ROWS)
    async with (
        api_process(api_case.env(), tmp_path / "api.log") as api,
        api.client(timeout=120) as importer,
        api.client(key=None, timeout=30) as prober,
    ):
        await prober.get("/healthz")  # a warm keep-alive connection
        latencies: list[float] = []
        answered_at: list[float] = []

        async def upload() -> httpx.Response:
            return await importer.post(
                "/v1/devices:import",
                content=body,
                headers={"content-type": "application/x-ndjson"},
            )

        importing = asyncio.create_task(upload())
        started = time.monotonic()
        while not importing.done():
            sent = time.monotonic()
            response = await prober.get("/healthz")
            assert response.status_code == 200
            answered_at.append(time.monotonic())
            latencies.append(answered_at[-1] - sent)
            await asyncio.sleep(0.02)
        response = await importing
        took = time.monotonic() - started

    assert response.status_code == 200, response.text[:500]
    result = response.json()
    assert (result["created"], result["failed"]) == (0, ROWS)
    assert result["errors"][-1]["row"] == ROWS
    assert result["errors"][0]["errors"][0]["field"] == "device_id"
    gaps = [b - a for a, b in zip([started, *answered_at], answered_at, strict=False)]
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98] if latencies[1:] else 0.0
    log.warning(
        "import of %d bad rows took %.1f s; /healthz answered %d times, p50 %.1f ms,"
        " p99 %.1f ms, max %.1f ms, longest gap %.2f s",
        ROWS,
        took,
        len(latencies),
        statistics.median(latencies) * 1000,
        p99 * 1000,
        max(latencies) * 1000,
        max(gaps),
    )
    assert len(latencies) >= 10, f"health answered only {len(latencies)} times in {took:.1f} s"
    assert max(gaps) < MAX_HEALTH_GAP_S, f"/healthz unanswered for {max(gaps):.2f} s"
