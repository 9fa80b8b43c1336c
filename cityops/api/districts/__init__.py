"""Districts and their KPIs."""
