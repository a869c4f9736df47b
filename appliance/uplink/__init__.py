"""The uplink: publishes the outbox to the MQTT broker (QoS 1, retained status, last will)."""

from appliance.backoff import backoff_delay_s
from appliance.uplink.mqtt import MqttUplink
from appliance.uplink.topics import alert_topic, status_topic, telemetry_topic

__all__ = ["MqttUplink", "alert_topic", "backoff_delay_s", "status_topic", "telemetry_topic"]
