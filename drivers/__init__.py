"""Sensor protocol drivers. This package knows nothing of `appliance/`."""
