"""Downsampled telemetry (one aggregate per machine per interval) and bandwidth accounting."""

from appliance.downsample.bandwidth import BandwidthMeter
from appliance.downsample.telemetry import TelemetryDownsampler

__all__ = ["BandwidthMeter", "TelemetryDownsampler"]
