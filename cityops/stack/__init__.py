"""cityops.stack."""
