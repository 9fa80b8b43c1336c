"""The API's outbox table and the relay that publishes it to Kafka."""
