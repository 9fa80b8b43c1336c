"""`/v1/stream`: server-sent events from Kafka."""
