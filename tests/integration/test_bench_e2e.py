"""The end-to-end benchmark at a tiny size against the real stack: the harness still works."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from bench.e2e import E2EConfig, run_e2e_bench

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.postgres]


async def test_probes_are_seen_in_the_api_under_load(stack_env: Mapping[str, str]) -> None:
    config = E2EConfig(
        devices_per_kind=25,
        rate=100.0,
        warmup_s=2.0,
        window_s=4.0,
        windows=1,
        probe_bins=6,
        probe_interval_s=0.25,
    )
    windows, pooled = await run_e2e_bench(stack_env, config=config)
    assert len(windows) == 1
    window = windows[0]
    # probes were published and found through the API's list endpoints and its stream
    assert pooled["state_samples"] >= 3
    assert pooled["ticket_samples"] >= 2
    assert 0 < pooled["state_p50_ms"] < 5000
    assert 0 < pooled["ticket_p50_ms"] < 10_000
    assert pooled["stream_state_p50_ms"] is not None
    assert pooled["mqtt_puback_p50_ms"] is not None  # the broker answered the probes
    assert pooled["devices"] == 100
    # the simulated load went through ingest into the benchmark's own telemetry topic
    assert window["pipeline_msgs_per_s"] > 20
    assert window["cpu_ingest_pct"] > 0
