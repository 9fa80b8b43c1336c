"""Prometheus metrics of the rules service, registered on a registry passed in."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class RulesMetrics:
    """Every metric the rules service exports (labels are small fixed sets, never a device)."""

    events: Counter
    evaluations: Counter
    tickets_opened: Counter
    tickets_resolved: Counter
    tickets_escalated: Counter
    occurrences: Counter
    open_tickets: Gauge
    consumer_lag: Gauge
    processing_latency: Histogram
    batch_duration: Histogram
    batch_size: Histogram
    devices: Gauge
    timers: Gauge
    timers_fired: Counter
    state_conflicts: Counter
    errors: Counter
    events_published: Counter
    override_problems: Counter
    set_aside: Counter


def create_metrics(registry: CollectorRegistry) -> RulesMetrics:
    """Register the metrics on `registry`."""
    return RulesMetrics(
        events=Counter(
            "cityops_rules_events_total",
            "Events consumed, by topic (telemetry/status) and outcome",
            ["topic", "outcome"],
            registry=registry,
        ),
        evaluations=Counter(
            "cityops_rules_evaluations_total",
            "Rule evaluations (one per rule per reading)",
            registry=registry,
        ),
        tickets_opened=Counter(
            "cityops_rules_tickets_opened_total",
            "Tickets opened",
            ["rule", "priority"],
            registry=registry,
        ),
        tickets_resolved=Counter(
            "cityops_rules_tickets_resolved_total",
            "Tickets auto-resolved",
            ["rule", "priority"],
            registry=registry,
        ),
        tickets_escalated=Counter(
            "cityops_rules_tickets_escalated_total",
            "Ticket escalations, by rule and the new priority",
            ["rule", "priority"],
            registry=registry,
        ),
        occurrences=Counter(
            "cityops_rules_occurrences_total",
            "Repeated triggers counted on an already open ticket",
            ["rule"],
            registry=registry,
        ),
        open_tickets=Gauge(
            "cityops_rules_open_tickets",
            "Unresolved tickets by district and priority (whole city; use max() across replicas)",
            ["district", "priority"],
            registry=registry,
        ),
        consumer_lag=Gauge(
            "cityops_rules_consumer_lag_messages",
            "Records not yet processed on this replica's partitions",
            ["topic"],
            registry=registry,
        ),
        processing_latency=Histogram(
            "cityops_rules_processing_latency_seconds",
            "From ingest's received_at to the rules' database commit",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        ),
        batch_duration=Histogram(
            "cityops_rules_batch_duration_seconds",
            "Time to evaluate, write and commit one batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        ),
        batch_size=Histogram(
            "cityops_rules_batch_records",
            "Records per batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000),
            registry=registry,
        ),
        devices=Gauge(
            "cityops_rules_devices",
            "Devices whose state this replica holds",
            registry=registry,
        ),
        timers=Gauge(
            "cityops_rules_timers",
            "Pending deadlines (offline, duration, escalation)",
            registry=registry,
        ),
        timers_fired=Counter(
            "cityops_rules_timers_fired_total",
            "Deadlines reached, by timer kind",
            ["timer"],
            registry=registry,
        ),
        state_conflicts=Counter(
            "cityops_rules_state_conflicts_total",
            "Batches rolled back because another replica wrote a device's state",
            registry=registry,
        ),
        errors=Counter(
            "cityops_rules_errors_total",
            "Failures by dependency (database, kafka)",
            ["dependency"],
            registry=registry,
        ),
        events_published=Counter(
            "cityops_rules_ticket_events_published_total",
            "city.tickets.v1 events acknowledged by Kafka",
            registry=registry,
        ),
        override_problems=Counter(
            "cityops_rules_override_problems_total",
            "Invalid rule overrides found in registry metadata (ignored)",
            registry=registry,
        ),
        set_aside=Counter(
            "cityops_rules_set_aside_total",
            "Records rules could not process, produced to the dead-letter topic, by reason",
            ["reason"],
            registry=registry,
        ),
    )
