"""Prometheus metrics of the API service, on a registry passed in (never the global one)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class ApiMetrics:
    """Every metric `cityops api` exports."""

    requests: Counter
    request_seconds: Histogram
    projector_records: Counter
    projector_invalid: Counter
    projector_set_aside: Counter
    projector_write_retries: Counter
    projector_batch_records: Histogram
    projector_batch_seconds: Histogram
    projector_lag: Gauge
    projector_state_updates: Counter
    readings_written: Counter
    provisioned: Counter
    revoked: Counter
    credential_syncs: Counter
    ticket_transitions: Counter
    stream_clients: Gauge
    stream_events: Counter
    stream_dropped: Counter
    stream_resumes: Gauge
    stream_resumes_refused: Counter
    stream_skipped: Counter
    outbox_published: Counter
    outbox_failed: Counter
    outbox_backlog: Gauge
    outbox_oldest_age: Gauge


def create_metrics(registry: CollectorRegistry) -> ApiMetrics:
    """Register the API metrics on `registry`."""
    return ApiMetrics(
        requests=Counter(
            "cityops_api_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        ),
        request_seconds=Histogram(
            "cityops_api_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        ),
        projector_records=Counter(
            "cityops_api_projector_records_total",
            "Kafka records projected, by topic kind (telemetry, status).",
            ["source"],
            registry=registry,
        ),
        projector_invalid=Counter(
            "cityops_api_projector_invalid_records_total",
            "Records the projector could not decode (set aside as dead letters).",
            ["source"],
            registry=registry,
        ),
        projector_set_aside=Counter(
            "cityops_api_projector_set_aside_total",
            "Records the projector could not process, produced to the dead-letter topic.",
            ["reason"],
            registry=registry,
        ),
        projector_write_retries=Counter(
            "cityops_api_projector_write_retries_total",
            "Read-model writes retried after a PostgreSQL or Kafka failure (an outage).",
            registry=registry,
        ),
        projector_batch_records=Histogram(
            "cityops_api_projector_batch_records",
            "Records per projector batch.",
            buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
            registry=registry,
        ),
        projector_batch_seconds=Histogram(
            "cityops_api_projector_batch_duration_seconds",
            "Time to write one batch to PostgreSQL and commit its offsets.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        ),
        projector_lag=Gauge(
            "cityops_api_projector_lag_records",
            "Records behind the high watermark over this replica's partitions.",
            registry=registry,
        ),
        projector_state_updates=Counter(
            "cityops_api_projector_state_updates_total",
            "device_state rows moved forward by a newer seq.",
            registry=registry,
        ),
        readings_written=Counter(
            "cityops_api_projector_readings_written_total",
            "History rows inserted (replays and duplicates excluded).",
            registry=registry,
        ),
        provisioned=Counter(
            "cityops_api_devices_provisioned_total",
            "Devices created with MQTT credentials.",
            registry=registry,
        ),
        revoked=Counter(
            "cityops_api_devices_revoked_total",
            "Devices whose MQTT credentials were revoked.",
            registry=registry,
        ),
        credential_syncs=Counter(
            "cityops_api_mqtt_credential_syncs_total",
            "Broker password-file rewrites, by result (ok, error, skipped).",
            ["result"],
            registry=registry,
        ),
        ticket_transitions=Counter(
            "cityops_api_ticket_transitions_total",
            "Operator ticket transitions, by target status.",
            ["status"],
            registry=registry,
        ),
        stream_clients=Gauge(
            "cityops_api_stream_clients",
            "Connected Server-Sent Events clients.",
            registry=registry,
        ),
        stream_events=Counter(
            "cityops_api_stream_events_total",
            "Events fanned out to stream clients, by type.",
            ["type"],
            registry=registry,
        ),
        stream_dropped=Counter(
            "cityops_api_stream_dropped_clients_total",
            "Stream clients disconnected because they could not keep up.",
            registry=registry,
        ),
        stream_resumes=Gauge(
            "cityops_api_stream_resumes",
            "Stream resumes (Last-Event-ID) replaying their window, each with its own consumer.",
            registry=registry,
        ),
        stream_resumes_refused=Counter(
            "cityops_api_stream_resumes_refused_total",
            "Stream resumes refused: busy (the cap, 503), window (too far back, 410),"
            " unavailable (Kafka, 503).",
            ["reason"],
            registry=registry,
        ),
        stream_skipped=Counter(
            "cityops_api_stream_records_skipped_total",
            "Kafka records the stream could not decode (skipped; the stream goes on).",
            ["topic"],
            registry=registry,
        ),
        outbox_published=Counter(
            "cityops_api_outbox_events_published_total",
            "Outbox events Kafka acknowledged (then deleted from the outbox), by topic.",
            ["topic"],
            registry=registry,
        ),
        outbox_failed=Counter(
            "cityops_api_outbox_events_failed_total",
            "Outbox events whose produce failed or timed out (they stay for a retry), by topic.",
            ["topic"],
            registry=registry,
        ),
        outbox_backlog=Gauge(
            "cityops_api_outbox_backlog_events",
            "Events waiting in the outbox (whole table: every replica reports the same rows).",
            registry=registry,
        ),
        outbox_oldest_age=Gauge(
            "cityops_api_outbox_oldest_age_seconds",
            "Age of the oldest event waiting in the outbox; 0 when it is empty.",
            registry=registry,
        ),
    )
