"""The read model: Kafka telemetry and status folded into PostgreSQL."""
