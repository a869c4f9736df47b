"""The supervisor: builds the pipeline from a config, starts sinks before sources, stops cleanly."""

from appliance.runtime.supervisor import Appliance

__all__ = ["Appliance"]
