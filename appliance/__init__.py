"""CNC edge-AI appliance: acquisition → features → batched inference → alerts → durable MQTT."""

__version__ = "0.1.0"
