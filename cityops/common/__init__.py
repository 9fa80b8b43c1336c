"""cityops.common."""
