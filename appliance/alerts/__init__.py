"""Alert rules on raw values and on model scores, with a raise/clear lifecycle."""

from appliance.alerts.rules import AlertEngine

__all__ = ["AlertEngine"]
