"""The JSON documents of the local API, built from the stages' own ``stats()`` at request time.

Every function takes the running appliance (:class:`Source`) and returns plain builtins. The
shapes are documented, with examples, in docs/api.md (tests/api checks the examples against real
responses).
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from appliance.acquire import Acquisition
from appliance.alerts import AlertEngine
from appliance.api.live import LiveView
from appliance.config import Config
from appliance.infer.bundle import ModelBundle
from appliance.infer.select import ServingEngine
from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink


class Source(Protocol):
    """What the API reads from the running appliance (:class:`appliance.runtime.Appliance`)."""

    cfg: Config
    alerts: AlertEngine
    acquisition: Acquisition
    outbox: SqliteOutbox
    uplink: MqttUplink
    live: LiveView
    started_at: float

    @property
    def bundle(self) -> ModelBundle | None: ...  # None: no model configured, nothing is scored

    @property
    def engine(self) -> ServingEngine | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def outbox_failing(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...


def readiness(app: Source) -> list[str]:
    """Why the appliance is not ready to serve (empty: ready): the engine must be loaded (when
    a model is configured), the outbox writable and the uplink connected."""
    reasons: list[str] = []
    if not app.running:
        reasons.append("appliance is not running")
    if app.engine is not None and app.bundle is not None and not app.engine.started:
        reasons.append(f"engine not loaded (model {app.bundle.name})")
    outbox_dir = os.path.dirname(app.cfg.outbox.path) or "."
    if app.outbox_failing:
        reasons.append("outbox is failing to store messages (see append_failures)")
    elif not os.access(outbox_dir, os.W_OK):
        reasons.append(f"outbox directory {outbox_dir} is not writable")
    if not app.uplink.connected:
        reasons.append(f"uplink not connected to {app.cfg.mqtt.host}:{app.cfg.mqtt.port}")
    return reasons


def _protocol(app: Source, index: int) -> str:
    tag = type(app.cfg.devices[index]).__struct_config__.tag
    return str(tag) if tag is not None else ""


#: Most sparklines per device tile on the status page.
MAIN_CHANNELS = 4


def main_channels(app: Source, channels: list[str]) -> list[str]:
    """The channels the status page draws (at most :data:`MAIN_CHANNELS`): those alert rules
    watch, then the model's inputs, then the device's others, in that order."""
    ruled = [r.channel for r in app.cfg.alerts.rules if r.source == "channel"]
    model = [f.channel for f in app.bundle.features] if app.bundle is not None else []
    ordered = dict.fromkeys([*ruled, *model, *channels])
    return [c for c in ordered if c in channels][:MAIN_CHANNELS]


def device(app: Source, index: int, stats: dict[str, Any], history: bool) -> dict[str, Any]:
    name = stats["device"]
    values = app.live.last_values(name)
    channels = list(values)
    out: dict[str, Any] = {
        "name": name,
        "protocol": _protocol(app, index),
        "state": stats["state"],
        "last_poll_ts": stats["last_poll_ts"],
        "score": app.live.last_score(name),
        "main_channels": main_channels(app, channels),
        "values": values,
        "stats": stats,
    }
    if history:
        out["history"] = app.live.history(name)
    return out


def devices(app: Source, history: bool = False) -> list[dict[str, Any]]:
    return [device(app, i, s, history) for i, s in enumerate(app.acquisition.stats())]


def alerts(app: Source) -> dict[str, Any]:
    severity = {r.name: r.severity for r in app.cfg.alerts.rules}
    active = [
        {
            **a,
            "severity": severity.get(str(a["rule"]), "warning"),
            "acknowledged": app.alerts.acknowledged(str(a["alert_id"])),
        }
        for a in app.alerts.active()
    ]
    return {"raised": app.alerts.raised, "cleared": app.alerts.cleared, "active": active}


def engine(app: Source, stats: dict[str, Any]) -> dict[str, Any]:
    """The serving chain (``stats()["engine"]``: backend, chain with reasons, per-backend
    counters and latency histograms) with the model and the batcher. Without a model (nothing
    is scored): ``model``, ``backend`` and ``batcher`` are null and ``loaded`` is false."""
    if app.bundle is None or app.engine is None:
        return {"model": None, "loaded": False, "backend": None, "batcher": None}
    return {
        "model": {
            "name": app.bundle.name,
            "version": app.bundle.version,
            # the first model's releases (docs/models.md, "Releasing a model")
            "release": next(iter(stats["models"].values()))["release"],
        },
        "loaded": app.engine.started,
        **stats["engine"],
        "batcher": stats["batcher"],
    }


def status(app: Source, history_since: float | None = None) -> dict[str, Any]:
    """The whole picture (the status page and ``appliance status``). ``history_since`` (epoch
    s) adds each device's sparkline points newer than it (``history``)."""
    stats = app.stats()
    reasons = readiness(app)
    devs = []
    for i, s in enumerate(stats["acquisition"]):
        d = device(app, i, s, history=False)
        del d["stats"]
        d["polls"], d["errors"] = s["polls"], s["errors"]
        d["jitter_ms_p99"] = s["jitter_ms_p99"]
        if history_since is not None:
            h = app.live.history(d["name"])
            keep = [j for j, t in enumerate(h["t"]) if t > history_since]
            skeep = [j for j, t in enumerate(h["score"]["t"]) if t > history_since]
            d["history"] = {
                "t": [h["t"][j] for j in keep],
                "channels": {c: [v[j] for j in keep] for c, v in h["channels"].items()},
                "score": {k: [v[j] for j in skeep] for k, v in h["score"].items()},
            }
        devs.append(d)
    return {
        "appliance": {
            "id": app.cfg.appliance.id,
            "version": stats["version"],
            "uptime_s": stats["uptime_s"],
            "now": time.time(),
            "history_s": app.cfg.api.history_s,
            "refresh_ms": app.cfg.api.refresh_ms,
        },
        "ready": not reasons,
        "reasons": reasons,
        "devices": devs,
        "alerts": alerts(app),
        "engine": engine(app, stats),
        "pipeline": {
            "frames": stats["frames"],
            "windows_closed": stats["windows_closed"],
            "feature_rows": stats["feature_rows"],
            "incomplete_windows": stats["incomplete_windows"],
            "telemetry_messages": stats["telemetry_messages"],
        },
        "outbox": stats["outbox"],
        "uplink": {
            **stats["uplink"],
            "connected": app.uplink.connected,
            "broker": f"{app.cfg.mqtt.host}:{app.cfg.mqtt.port}",
            "rejected_by_reason": app.uplink.rejected_by_reason(),
        },
    }
