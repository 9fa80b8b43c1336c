"""Devices: registry writes, MQTT credentials, state and readings history."""
