"""API keys: admin routes, storage and last-use tracking."""
