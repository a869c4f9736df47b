"""The local HTTP API: health, readiness, Prometheus metrics, JSON views and the status page.

Wiring, not a stage: it reads the running appliance (``views.Source``) and its stages' own
``stats()``; the supervisor starts it after the pipeline's sinks and stops it first.
"""

from appliance.api.live import LiveView
from appliance.api.server import ApiServer

__all__ = ["ApiServer", "LiveView"]
