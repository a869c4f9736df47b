"""Edge–cloud coordination over MQTT: commands from upstream, answered with replies (issue 16).

Wiring, not a pipeline stage: handlers act on the running :class:`~appliance.runtime.Appliance`.
The handler interface is in :mod:`appliance.downlink.base`.
"""
