"""Wire every stage from one :class:`~appliance.config.Config` and run it in one asyncio process.

Start order (sinks before sources): outbox → uplink → engine/batcher → features/alerts →
acquisition. Stop order (sources before sinks): acquisition stops polling; open windows are
flushed; queued rows are scored; the uplink drains the outbox within a deadline and publishes its
retained ``offline`` status; the outbox closes. Whatever the drain deadline leaves unsent stays in
the outbox on disk and goes out after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from appliance import __version__
from appliance.acquire import Acquisition
from appliance.alerts import AlertEngine
from appliance.batch import Batcher
from appliance.config import Config
from appliance.contracts import Envelope, Frame
from appliance.downsample import TelemetryDownsampler
from appliance.features import FeatureBuilder, WindowAggregator
from appliance.infer import EngineOptions, ServingEngine
from appliance.outbox import OutboxError, OutboxFullError, SqliteOutbox
from appliance.runtime.checks import config_warnings, load_model_for
from appliance.runtime.health import HealthLog
from appliance.runtime.sdnotify import Notifier
from appliance.uplink import MqttUplink
from appliance.uplink.topics import alert_topic, telemetry_topic

log = logging.getLogger(__name__)


class Appliance:
    """The whole pipeline. Construction does no I/O; ``start()`` acquires everything."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        aid = cfg.appliance.id
        prefix = cfg.mqtt.topic_prefix
        self.bundle = load_model_for(cfg)
        for warning in config_warnings(cfg):
            log.warning("config: %s", warning)
        self.outbox = SqliteOutbox(
            cfg.outbox.path,
            appliance_id=aid,
            synchronous=cfg.outbox.synchronous,
            disk_budget_mb=cfg.outbox.disk_budget_mb,
            coarsen_windows=cfg.outbox.coarsen_windows,
        )
        self.uplink = MqttUplink(cfg.mqtt, aid, self.outbox)
        self.engine = ServingEngine(
            self.bundle,
            cfg.engine.backend,
            EngineOptions.from_config(cfg, self.bundle),
        )
        self.alerts = AlertEngine(
            cfg.alerts.rules, self._append, lambda m: alert_topic(prefix, aid, m)
        )
        self.batcher = Batcher(
            self.engine,
            self.alerts.on_scores,
            max_batch=cfg.batch.max_batch,
            max_delay_ms=cfg.batch.max_delay_ms,
            queue_size=cfg.batch.queue_size,
        )
        self.features = FeatureBuilder(self.bundle.features, self.batcher.submit)
        self.telemetry = TelemetryDownsampler(
            cfg.telemetry.stats, self._append, lambda m: telemetry_topic(prefix, aid, m)
        )
        window_sinks: list[Any] = [self.features]
        if cfg.telemetry.enabled:
            window_sinks.insert(0, self.telemetry)
        self.windows = WindowAggregator(cfg.features.window_s, window_sinks)
        self.acquisition = Acquisition(cfg.devices, self._on_frame)
        self.health = HealthLog(cfg.appliance.health_log_s, self.stats)
        self.notifier = Notifier()  # systemd Type=notify: READY=1, watchdog, STOPPING=1
        self.frames = 0
        self.append_failures = 0
        self._append_failing = False
        self.started_at = 0.0
        self._started = False
        self._stopped = False

    # -- wiring -----------------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        self.frames += 1
        self.windows.on_frame(frame)
        self.alerts.on_frame(frame)

    def _append(self, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to the outbox. When the outbox cannot store them (a full disk that
        eviction could not relieve, a failing disk, an outbox file that cannot be replaced), the
        envelopes are lost: counted in ``append_failures`` and logged once per episode, so the
        pipeline (acquisition, alerts) keeps running rather than crashing."""
        try:
            self.outbox.append(envelopes)
        except (OutboxError, sqlite3.Error) as err:
            self.append_failures += len(envelopes)
            if not self._append_failing:
                self._append_failing = True
                what = "outbox full" if isinstance(err, OutboxFullError) else "outbox failed"
                log.error("%s: %s; messages are being lost (counted)", what, err)
            return
        if self._append_failing:
            self._append_failing = False
            log.info("outbox accepts messages again (%d lost so far)", self.append_failures)
        self.uplink.notify()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.started_at = time.time()
        log.info(
            "appliance %s v%s starting: %d devices, model %s %s",
            self.cfg.appliance.id,
            __version__,
            len(self.cfg.devices),
            self.bundle.name,
            self.bundle.version,
        )
        self.outbox.open()
        await self.uplink.start()
        await self.batcher.start()
        log.info("engine: serving on %s — %s", self.engine.backend, self.engine.summary())
        await self.acquisition.start()
        self.health.start()
        log.info("appliance %s running", self.cfg.appliance.id)
        self.notifier.ready(f"running on {self.engine.backend}")

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop sources first, drain, then sinks. Idempotent; bounded by ``drain_timeout_s``."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        log.info("appliance stopping: acquisition first, then draining")
        self.notifier.stopping()
        await self.health.stop()
        await self.acquisition.stop()
        self.windows.flush()
        await self.batcher.drain(timeout_s=min(2.0, drain_timeout_s / 2))
        await self.batcher.close()
        await self.uplink.stop(drain_timeout_s=drain_timeout_s)
        self.outbox.close()
        await self.notifier.close()
        log.info("appliance stopped")

    async def run_until_signal(self, duration_s: float | None = None) -> None:
        """Run until SIGINT/SIGTERM (or ``duration_s``), then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), duration_s)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "appliance": self.cfg.appliance.id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            "frames": self.frames,
            "acquisition": self.acquisition.stats(),
            "windows_closed": self.windows.windows_closed,
            "feature_rows": self.features.rows,
            "incomplete_windows": self.features.incomplete_windows,
            "batcher": self.batcher.stats(),
            "engine": self.engine.stats(),
            "alerts": {
                "raised": self.alerts.raised,
                "cleared": self.alerts.cleared,
                "active": self.alerts.active(),
            },
            "telemetry_messages": self.telemetry.messages,
            "outbox": {**self.outbox.stats(), "append_failures": self.append_failures},
            "uplink": self.uplink.stats(),
        }
