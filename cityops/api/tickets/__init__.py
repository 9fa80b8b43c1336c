"""Tickets: lists, detail and operator transitions."""
