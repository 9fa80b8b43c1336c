"""cityops.ingest."""
