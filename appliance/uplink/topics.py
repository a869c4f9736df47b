"""MQTT topic names: part of the public contract with subscribers (see docs/mqtt.md).

Layout, one subtree per appliance::

    {prefix}/{appliance_id}/status              retained online/offline (birth + last will)
    {prefix}/{appliance_id}/telemetry/{machine} downsampled per-machine telemetry, QoS 1
    {prefix}/{appliance_id}/alerts/{machine}    alert raise/clear events, QoS 1
    {prefix}/{appliance_id}/quality/{machine}   data-quality events, QoS 1
    {prefix}/{appliance_id}/cmd/{command}       commands to the appliance (downlink), QoS 1
    {prefix}/{appliance_id}/reply/{request_id}  the appliance's reply to one command, QoS 1

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


def command_topic(prefix: str, appliance_id: str, command: str = "+") -> str:
    """Commands to one appliance (``command`` = ``+``: the filter the appliance subscribes)."""
    return f"{prefix}/{appliance_id}/cmd/{command}"


def reply_topic(prefix: str, appliance_id: str, request_id: str) -> str:
    """The reply to the command with ``request_id`` (``[A-Za-z0-9._-]{1,64}``)."""
    return f"{prefix}/{appliance_id}/reply/{request_id}"
