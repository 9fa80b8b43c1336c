"""Prometheus metrics of the ingest service, on a registry passed in (never the global one)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cityops.common.kinds import RejectReason

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


@dataclass(frozen=True, slots=True)
class IngestMetrics:
    """Every series ingest exports; labels come from small fixed sets (kind, channel, reason)."""

    received: Counter
    accepted: Counter
    rejected: Counter
    deadletters_suppressed: Counter
    acked: Counter
    produce_latency: Histogram
    sensor_lag: Histogram
    in_flight: Gauge
    kafka_errors: Counter
    mqtt_connected: Gauge
    mqtt_reconnects: Counter
    registry_devices: Gauge
    registry_topic_records: Counter
    registry_lookups: Counter
    registry_lookup_devices: Counter
    registry_lookup_skipped: Counter
    registry_lookup_latency: Histogram
    registry_negative_hits: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> IngestMetrics:
        """Register the series on `registry`."""
        metrics = cls(
            received=Counter(
                "cityops_ingest_received_messages_total",
                "MQTT messages received, by kind and channel (kind 'unknown' for bad topics).",
                ["kind", "channel"],
                registry=registry,
            ),
            accepted=Counter(
                "cityops_ingest_accepted_messages_total",
                "Messages validated and produced to the telemetry or status topic.",
                ["kind", "channel"],
                registry=registry,
            ),
            rejected=Counter(
                "cityops_ingest_rejected_messages_total",
                "Messages dead-lettered, by A5 reason.",
                ["reason"],
                registry=registry,
            ),
            deadletters_suppressed=Counter(
                "cityops_ingest_deadletters_suppressed_total",
                "Rejects past their device's dead-letter budget: counted in a summary record "
                "instead of copied, by A5 reason.",
                ["reason"],
                registry=registry,
            ),
            acked=Counter(
                "cityops_ingest_acked_messages_total",
                "PUBACKs sent after Kafka acknowledged the record.",
                registry=registry,
            ),
            produce_latency=Histogram(
                "cityops_ingest_produce_latency_seconds",
                "Receive to Kafka ack; one observation per run of released acks (its oldest).",
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            sensor_lag=Histogram(
                "cityops_ingest_sensor_lag_seconds",
                "From the sensor's ts to ingest receiving the reading.",
                buckets=_LAG_BUCKETS,
                registry=registry,
            ),
            in_flight=Gauge(
                "cityops_ingest_in_flight_messages",
                "Messages received and not yet acknowledged to the broker.",
                registry=registry,
            ),
            kafka_errors=Counter(
                "cityops_ingest_kafka_errors_total",
                "Failed Kafka deliveries (each is retried; nothing is acked before success).",
                registry=registry,
            ),
            mqtt_connected=Gauge(
                "cityops_ingest_mqtt_connected",
                "1 while connected to the MQTT broker.",
                registry=registry,
            ),
            mqtt_reconnects=Counter(
                "cityops_ingest_mqtt_reconnects_total",
                "MQTT connection losses.",
                registry=registry,
            ),
            registry_devices=Gauge(
                "cityops_ingest_registry_devices",
                "Enabled devices in the in-memory registry cache.",
                registry=registry,
            ),
            registry_topic_records=Counter(
                "cityops_ingest_registry_topic_records_total",
                "Records read from the devices topic: applied, deleted (tombstone), stale "
                "(older than the cached row), invalid.",
                ["outcome"],
                registry=registry,
            ),
            registry_lookups=Counter(
                "cityops_ingest_registry_lookups_total",
                "PostgreSQL lookups of devices a reading named but the cache did not know.",
                ["outcome"],
                registry=registry,
            ),
            registry_lookup_devices=Counter(
                "cityops_ingest_registry_lookup_devices_total",
                "Device ids looked up on a registry miss, by result (found, absent).",
                ["result"],
                registry=registry,
            ),
            registry_lookup_skipped=Counter(
                "cityops_ingest_registry_lookup_skipped_total",
                "Registry misses dead-lettered without a lookup (cap, negative_cache_full, "
                "after_error).",
                ["reason"],
                registry=registry,
            ),
            registry_lookup_latency=Histogram(
                "cityops_ingest_registry_lookup_seconds",
                "Duration of one registry lookup (how long the missed readings were held).",
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            registry_negative_hits=Counter(
                "cityops_ingest_registry_negative_cache_hits_total",
                "Registry misses answered by the negative cache (no query).",
                registry=registry,
            ),
        )
        for reason in RejectReason:  # exported at 0 from start-up, so an alert sees the first
            metrics.deadletters_suppressed.labels(reason.value)
        return metrics
