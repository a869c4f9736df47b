"""MQTT topic names: part of the public contract with subscribers (see docs/mqtt.md).

Layout, one subtree per appliance::

    {prefix}/{appliance_id}/status              retained online/offline (birth + last will)
    {prefix}/{appliance_id}/telemetry/{machine} downsampled per-machine telemetry, QoS 1
    {prefix}/{appliance_id}/alerts/{machine}    alert raise/clear events, QoS 1
    {prefix}/{appliance_id}/quality/{machine}   data-quality events, QoS 1

``prefix`` comes from ``mqtt.topic_prefix`` (validated to hold no wildcard); ids and machine
names are config names (``[A-Za-z0-9][A-Za-z0-9_.-]*``), so no level contains ``/``, ``+`` or ``#``.
"""

from __future__ import annotations


def status_topic(prefix: str, appliance_id: str) -> str:
    """Retained online/offline status of one appliance (its birth message and last will)."""
    return f"{prefix}/{appliance_id}/status"


def telemetry_topic(prefix: str, appliance_id: str, machine: str) -> str:
    """Downsampled telemetry of one machine."""
    return f"{prefix}/{appliance_id}/telemetry/{machine}"


def alert_topic(prefix: str, appliance_id: str, machine: str) -> str:
    """Alert events (raise/clear) of one machine."""
    return f"{prefix}/{appliance_id}/alerts/{machine}"


def quality_topic(prefix: str, appliance_id: str, machine: str) -> str:
    """Data-quality events (stale, stuck, out of range, clock skew) of one machine."""
    return f"{prefix}/{appliance_id}/quality/{machine}"
