"""cityops.simulator."""
