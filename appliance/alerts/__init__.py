"""Alert rules on raw values, data age and model scores, with a persisted lifecycle."""

from appliance.alerts.rules import AlertEngine
from appliance.alerts.store import AlertStore

__all__ = ["AlertEngine", "AlertStore"]
