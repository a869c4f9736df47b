"""Downsampled telemetry: one message per machine window."""

from appliance.downsample.telemetry import TelemetryDownsampler

__all__ = ["TelemetryDownsampler"]
