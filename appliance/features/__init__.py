"""Per-machine windows over the acquired stream, and model feature rows built from them."""

from appliance.features.windows import FeatureBuilder, WindowAggregator

__all__ = ["FeatureBuilder", "WindowAggregator"]
