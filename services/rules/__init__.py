"""cityops.rules."""
