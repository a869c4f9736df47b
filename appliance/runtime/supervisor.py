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
from collections.abc import Callable, Sequence
from typing import Any

from appliance import __version__
from appliance.acquire import Acquisition
from appliance.alerts import AlertEngine
from appliance.batch import Batcher
from appliance.config import Config
from appliance.contracts import Envelope, FeatureRow, Frame, ScoreBatch, Window
from appliance.downsample import TelemetryDownsampler
from appliance.downsample.scores import ScoreJoiner
from appliance.features import FeatureBuilder, WindowAggregator
from appliance.features.samples import SampleFeatureBuilder
from appliance.infer import EngineOptions, ServingEngine
from appliance.outbox import OutboxError, OutboxFullError, SqliteOutbox
from appliance.runtime.checks import ServedModel, config_warnings, served_models
from appliance.runtime.health import HealthLog
from appliance.uplink import MqttUplink
from appliance.uplink.topics import alert_topic, telemetry_topic

log = logging.getLogger(__name__)


class _Model:
    """One served model's stages: engine, batcher and the feature builder for its machines."""

    def __init__(
        self,
        served: ServedModel,
        cfg: Config,
        on_scores: Callable[[str, ScoreBatch], None],
        all_machines: Sequence[str],
    ) -> None:
        self.name = served.name
        self.bundle = served.bundle
        self.machines = frozenset(served.machines or all_machines)
        self.engine = ServingEngine(
            served.bundle, cfg.engine.backend, EngineOptions.from_config(cfg, served.bundle)
        )
        self.batcher = Batcher(
            self.engine,
            lambda batch: on_scores(self.name, batch),
            max_batch=cfg.batch.max_batch,
            max_delay_ms=cfg.batch.max_delay_ms,
            queue_size=cfg.batch.queue_size,
        )
        self.window_features: FeatureBuilder | None = None
        self.sample_features: SampleFeatureBuilder | None = None
        if served.bundle.needs_samples:
            self.sample_features = SampleFeatureBuilder(
                served.bundle.window_s,
                served.bundle.features,
                self.batcher.submit,
                served.bundle.condition,
            )
        else:
            self.window_features = FeatureBuilder(served.bundle.features, self.batcher.submit)

    def on_window(self, window: Window) -> None:
        if self.window_features is not None and window.machine in self.machines:
            self.window_features(window)

    def on_frame(self, frame: Frame) -> None:
        if self.sample_features is not None and frame.device in self.machines:
            self.sample_features.on_frame(frame)

    @property
    def features(self) -> FeatureBuilder | SampleFeatureBuilder:
        built = self.window_features or self.sample_features
        assert built is not None
        return built

    def submit(self, row: FeatureRow) -> None:
        self.batcher.submit(row)

    def stats(self) -> dict[str, Any]:
        f = self.features
        return {
            "model": self.bundle.name,
            "version": self.bundle.version,
            "machines": sorted(self.machines),
            "feature_rows": f.rows,
            "incomplete_windows": f.incomplete_windows,
            "unscored_windows": getattr(f, "unscored_windows", 0),
            "partial_windows": getattr(f, "partial_windows", 0),
            "batcher": self.batcher.stats(),
            "engine": self.engine.stats(),
        }


class Appliance:
    """The whole pipeline. Construction does no I/O; ``start()`` acquires everything."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        aid = cfg.appliance.id
        prefix = cfg.mqtt.topic_prefix
        served = served_models(cfg)
        self.bundle = served[0].bundle
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
        self.alerts = AlertEngine(
            cfg.alerts.rules,
            self._append,
            lambda m: alert_topic(prefix, aid, m),
            default_model=served[0].name,
        )
        machines = [d.name for d in cfg.devices]
        self.models = [_Model(m, cfg, self._on_scores, machines) for m in served]
        # the first model under the names the single-model appliance had
        self.engine = self.models[0].engine
        self.batcher = self.models[0].batcher
        self.features = self.models[0].features
        self.scores = ScoreJoiner(
            {d: [m.name for m in self.models if d in m.machines] for d in machines},
            self._append,
        )
        self.telemetry = TelemetryDownsampler(
            cfg.telemetry.stats, self.scores.hold, lambda m: telemetry_topic(prefix, aid, m)
        )
        window_sinks: list[Any] = [m.on_window for m in self.models if m.window_features]
        if cfg.telemetry.enabled:
            window_sinks.insert(0, self.telemetry)
        self.windows = WindowAggregator(cfg.features.window_s, window_sinks)
        self.acquisition = Acquisition(cfg.devices, self._on_frame)
        self.health = HealthLog(cfg.appliance.health_log_s, self.stats)
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
        for m in self.models:
            m.on_frame(frame)
        self.alerts.on_frame(frame)

    def _on_scores(self, model: str, batch: ScoreBatch) -> None:
        self.alerts.on_scores(batch, model)
        self.scores.on_scores(model, batch)

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
        for m in self.models:
            await m.batcher.start()
            log.info(
                "model %s (%s): serving on %s — %s",
                m.name,
                m.bundle.name,
                m.engine.backend,
                m.engine.summary(),
            )
        await self.acquisition.start()
        self.health.start()
        log.info("appliance %s running", self.cfg.appliance.id)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop sources first, drain, then sinks. Idempotent; bounded by ``drain_timeout_s``."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        log.info("appliance stopping: acquisition first, then draining")
        await self.health.stop()
        await self.acquisition.stop()
        self.windows.flush()
        for m in self.models:
            if m.sample_features is not None:
                m.sample_features.flush()
        for m in self.models:
            await m.batcher.drain(timeout_s=min(2.0, drain_timeout_s / 2))
        for m in self.models:
            await m.batcher.close()
        self.scores.flush()
        await self.uplink.stop(drain_timeout_s=drain_timeout_s)
        self.outbox.close()
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
            "models": {m.name: m.stats() for m in self.models},
            "alerts": {
                "raised": self.alerts.raised,
                "cleared": self.alerts.cleared,
                "active": self.alerts.active(),
            },
            "telemetry_messages": self.telemetry.messages,
            "outbox": {**self.outbox.stats(), "append_failures": self.append_failures},
            "uplink": self.uplink.stats(),
        }
