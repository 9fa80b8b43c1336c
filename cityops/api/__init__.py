"""cityops.api."""
