"""Wire every stage from one :class:`~appliance.config.Config` and run it in one asyncio process.

Start order (sinks before sources): outbox → alert state (restored, and whatever a crash left
unsent appended, before the uplink takes from the outbox; then a 1 s tick for the age rules and
data-quality staleness) → uplink → engine/batcher → features/alerts → acquisition. Stop order
(sources before sinks): a local alert action under way finishes; acquisition stops polling; open
windows are flushed (and the held telemetry interval sent); queued rows are scored; the uplink
drains the outbox within a deadline and publishes its retained ``offline`` status; the outbox
closes. Whatever the drain deadline leaves unsent stays in the outbox on disk and goes out after
the next start. The local API (``[api]``, appliance/api/) starts after the uplink, before the
engine, and stops first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance import __version__
from appliance.acquire import Acquisition
from appliance.alerts import AlertEngine, AlertStore
from appliance.alerts.quality import DataQualityMonitor
from appliance.api import ApiServer, LiveView
from appliance.batch import Batcher
from appliance.config import AlertAction, Config, action_raw
from appliance.contracts import Envelope, FeatureRow, Frame, OutboxRecord, ScoreBatch, Window
from appliance.downsample import BandwidthMeter, TelemetryDownsampler
from appliance.downsample.scores import ScoreJoiner
from appliance.features import FeatureBuilder, WindowAggregator
from appliance.features.samples import SampleFeatureBuilder
from appliance.infer import EngineOptions, ModelBundle, ServingEngine
from appliance.infer.drift import DriftStage
from appliance.outbox import OutboxError, OutboxFullError, SqliteOutbox
from appliance.runtime.checks import ServedModel, config_warnings, served_models
from appliance.runtime.health import HealthLog
from appliance.runtime.model_store import released_bundle
from appliance.runtime.sdnotify import Notifier
from appliance.uplink import MqttUplink
from appliance.uplink.topics import alert_topic, quality_topic, telemetry_topic

log = logging.getLogger(__name__)


def state_dir(cfg: Config) -> Path:
    """The appliance's state directory: the folder of the outbox file (released models,
    ``<state_dir>/models/``, docs/models.md; the command channel's request-id store)."""
    return Path(cfg.outbox.path).parent


class GuardedEngine:
    """The batcher's engine after a model release (``appliance/downlink/model_release.py``):
    the new model serves; should it raise (no backend of it left), the same batch is re-run on
    the previous model, which serves every later batch too, and ``on_failure(reason)`` is called
    once, from the inference worker thread, so that the release is rolled back. No window is
    dropped or scored twice. Called from the batcher's worker thread only."""

    def __init__(
        self, new: ServingEngine, previous: ServingEngine, on_failure: Callable[[str], None]
    ) -> None:
        self.new = new
        self.previous = previous
        self._on_failure = on_failure
        self.failed = ""
        #: batches the new model scored
        self.batches = 0

    @property
    def n_features(self) -> int:
        return self.new.n_features

    def start(self) -> None:
        self.new.start()

    def infer(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], str]:
        if not self.failed:
            try:
                out = self.new.infer(batch)
            except ValueError:
                raise  # the batch itself is malformed, not the model
            except Exception as err:
                self.failed = str(err) or type(err).__name__
                self._on_failure(self.failed)
            else:
                self.batches += 1
                return out
        return self.previous.infer(batch)

    def close(self) -> None:
        self.new.close()
        self.previous.close()


async def run_until_signal(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    duration_s: float | None = None,
) -> None:
    """``start()``, wait for SIGINT/SIGTERM (or ``duration_s``), then ``stop()``, also when
    ``start()`` raised (what it started is released). The appliance's and the downlink runner's
    ``run_until_signal``."""
    halt = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, halt.set)
    try:
        await start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(halt.wait(), duration_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stop()


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
        #: after a release: the engine of the version before, loaded, the new one's fallback
        self.previous: ServingEngine | None = None
        #: model releases (appliance/downlink/model_release.py): counters and the last outcome
        self.releases: dict[str, Any] = {
            "swaps": 0,
            "refused": 0,
            "rolled_back": 0,
            "last": "",
        }
        self.batcher = Batcher(
            self.engine,
            lambda batch: on_scores(self.name, batch),
            max_batch=cfg.batch.max_batch,
            max_delay_ms=cfg.batch.max_delay_ms,
            queue_size=cfg.batch.queue_size,
        )
        self.window_features: FeatureBuilder | None = None
        self.sample_features: SampleFeatureBuilder | None = None
        #: the per-machine self-baseline stage (manifest ``baseline``) between the feature
        #: builders and the batcher; state in memory, per machine (appliance/infer/drift.py)
        self.drift = DriftStage(served.bundle.drift) if served.bundle.drift is not None else None
        self._emit = (
            self.batcher.submit if self.drift is None else self.drift.wrap(self.batcher.submit)
        )
        if served.bundle.needs_samples:
            self.sample_features = SampleFeatureBuilder(
                served.bundle.window_s,
                served.bundle.features,
                self._emit,
                served.bundle.condition,
            )
        else:
            self.window_features = FeatureBuilder(served.bundle.features, self._emit)

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
        self._emit(row)

    async def replace_model(
        self, bundle: ModelBundle, engine: ServingEngine, on_failure: Callable[[str], None]
    ) -> GuardedEngine:
        """Serve ``bundle`` on ``engine`` (started, parity-checked, same feature layout) from
        the next batch on (event loop). The engine serving now stays loaded as the fallback
        (:class:`GuardedEngine`); the one kept before it is closed."""
        older = self.previous
        guard = GuardedEngine(engine, self.engine, on_failure)
        self.batcher.replace_engine(guard)
        self.previous, self.engine, self.bundle = self.engine, engine, bundle
        if older is not None:
            await self.batcher.call_in_worker(older.close)
        return guard

    async def restore_previous(self) -> None:
        """Serve the previous model again (kept loaded since :meth:`replace_model`) and close
        the current one (event loop)."""
        prev = self.previous
        if prev is None:
            raise RuntimeError(f"model {self.name}: no previous engine loaded")
        current = self.engine
        self.batcher.replace_engine(prev)
        self.engine, self.bundle, self.previous = prev, prev.bundle, None
        await self.batcher.call_in_worker(current.close)

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
            **(
                {}
                if self.drift is None
                else {
                    "learning_windows": self.drift.learning_windows,
                    "baseline_keys": self.drift.machines(),
                    "baseline_invalid_windows": self.drift.invalid_windows,
                }
            ),
            "batcher": self.batcher.stats(),
            "engine": self.engine.stats(),
            "release": dict(self.releases),
        }


#: The cyclic collector's generation-2 threshold while an appliance runs with ``freeze_gc``
#: (Python's default: 10): a full collection after this many generation-1 collections.
GC_GEN2_THRESHOLD = 100


class Appliance:
    """The whole pipeline. Construction does no I/O; ``start()`` acquires everything.

    ``freeze_gc`` (``appliance run`` sets it): ``start()`` moves everything the process holds by
    then out of the cyclic garbage collector's generations (``gc.freeze()``) and raises its
    generation-2 threshold to :data:`GC_GEN2_THRESHOLD`, both undone by ``stop()``. Off by
    default, because it is process-wide: in a process that runs several appliances one after
    the other (the test suite), garbage frozen while one runs is only collected after its stop,
    inside whatever runs next."""

    def __init__(self, cfg: Config, *, freeze_gc: bool = False) -> None:
        self.cfg = cfg
        self.freeze_gc = freeze_gc
        aid = cfg.appliance.id
        prefix = cfg.mqtt.topic_prefix
        served = [  # empty: no model, nothing is scored
            s._replace(bundle=released_bundle(state_dir(cfg), s.name, s.bundle))
            for s in served_models(cfg)
        ]
        for warning in config_warnings(cfg, served):
            log.warning("config: %s", warning)
        self.outbox = SqliteOutbox.from_config(cfg.outbox, appliance_id=aid)
        self.uplink = MqttUplink(cfg.mqtt, aid, self.outbox)
        self.alerts = AlertEngine(
            cfg.alerts.rules,
            self._append,
            lambda m: alert_topic(prefix, aid, m),
            store=AlertStore(cfg.alerts.state_path, cfg.outbox.synchronous),
            devices=[d.name for d in cfg.devices],
            act=self._act,
            default_model=served[0].name if served else "",
        )
        machines = [d.name for d in cfg.devices]
        self.models = [_Model(m, cfg, self._on_scores, machines) for m in served]
        # the first model under the names the single-model appliance had (None: no model)
        first = self.models[0] if self.models else None
        self.batcher: Batcher | None = first.batcher if first is not None else None
        self.features: FeatureBuilder | SampleFeatureBuilder | None = (
            first.features if first is not None else None
        )
        self.scores = ScoreJoiner(
            {d: [m.name for m in self.models if d in m.machines] for d in machines},
            self._append,
            interval_stats=cfg.telemetry.interval_s > 0,
        )
        self.telemetry = TelemetryDownsampler(
            cfg.telemetry.stats,
            self.scores.hold,
            lambda m: telemetry_topic(prefix, aid, m),
            interval_s=cfg.telemetry.interval_s,
            deadband=cfg.telemetry.deadband,
            max_silence_s=cfg.telemetry.max_silence_s,
        )
        window_sinks: list[Any] = [m.on_window for m in self.models if m.window_features]
        window_sinks.append(self.alerts.on_window)
        if cfg.telemetry.enabled:
            window_sinks.insert(0, self.telemetry)
        self.live = LiveView(cfg.api.history_s, cfg.features.window_s)
        if cfg.api.enabled:
            window_sinks.append(self.live.on_window)
        self.api = ApiServer(cfg.api, self) if cfg.api.enabled else None
        self.windows = WindowAggregator(cfg.features.window_s, window_sinks)
        self.acquisition = Acquisition(cfg.devices, self._on_frame)
        self.bandwidth = BandwidthMeter(aid)
        q = cfg.quality
        self.quality_enabled = q.enabled
        self.quality = DataQualityMonitor(
            self._append,
            lambda m: quality_topic(prefix, aid, m),
            stale_s=q.stale_s,
            stuck_s=q.stuck_s,
            stuck_tolerance=q.stuck_tolerance,
            ranges=q.ranges,
            max_clock_skew_s=q.max_clock_skew_s,
        )
        self.health = HealthLog(cfg.appliance.health_log_s, self.health_stats)
        self.notifier = Notifier()  # systemd Type=notify: READY=1, watchdog, STOPPING=1
        self.frames = 0
        self.append_failures = 0
        self._append_failing = False
        self._pending_appends: list[Envelope] = []
        self._store_task: asyncio.Task[None] | None = None
        self._froze_gc = False
        self._gc_threshold: tuple[int, int, int] = gc.get_threshold()
        self.started_at = 0.0
        self._started = False
        self._stopped = False
        self._alert_tick: asyncio.Task[None] | None = None
        self._actions: set[asyncio.Task[None]] = set()
        #: registers alert actions may write (checked at load, and again before each write)
        self.writable = tuple(cfg.alerts.writable)
        #: the command channel's counters (``stats()["downlink"]``), set by the runner that
        #: owns the channel (appliance/downlink/runner.py); None: no channel
        self.downlink_stats: Callable[[], dict[str, Any]] | None = None

    @property
    def engine(self) -> ServingEngine | None:
        """The first model's engine (a model release replaces it); None: no model."""
        return self.models[0].engine if self.models else None

    @property
    def bundle(self) -> ModelBundle | None:
        """The first model's bundle (a model release replaces it); None: no model."""
        return self.models[0].bundle if self.models else None

    # -- wiring -----------------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        self.frames += 1
        self.bandwidth.on_frame(frame)
        if self.quality_enabled:
            self.quality.on_frame(frame)
        self.windows.on_frame(frame)
        for m in self.models:
            m.on_frame(frame)
        self.alerts.on_frame(frame)
        if self.api is not None:
            self.live.on_frame(frame)

    def _on_scores(self, model: str, batch: ScoreBatch) -> None:
        self.alerts.on_scores(batch, model)
        self.scores.on_scores(model, batch)
        if self.api is not None and model == self.models[0].name:  # the status page's score
            self.live.on_scores(batch)

    def _append(self, envelopes: Sequence[Envelope]) -> None:
        """Queue envelopes for the outbox: every envelope handed over during one event-loop
        iteration (all the windows that close at the same moment, their alerts) is stored in
        one outbox transaction, one fsync, by :meth:`_flush_appends` scheduled with
        ``call_soon``; the transaction runs in the outbox's writer thread
        (:meth:`SqliteOutbox.append_off_loop`), and what is handed over while it runs goes into
        the next one. Without a running loop (tests) they are stored at once."""
        if not envelopes:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._store(envelopes)
            return
        if not self._pending_appends:
            loop.call_soon(self._flush_appends)
        self._pending_appends.extend(envelopes)

    def _flush_appends(self) -> None:
        """Start storing the envelopes queued by :meth:`_append` (one outbox transaction in the
        writer thread), unless a transaction is under way: it takes them when it is done."""
        if self._store_task is not None and not self._store_task.done():
            return
        if not self._pending_appends:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            envelopes, self._pending_appends = self._pending_appends, []
            self._store(envelopes)
            return
        self._store_task = loop.create_task(self._store_queued(), name="outbox append")

    async def _store_queued(self) -> None:
        """Store queued envelopes, one transaction at a time, until none is left."""
        while self._pending_appends:
            envelopes, self._pending_appends = self._pending_appends, []
            await self._store_async(envelopes)

    async def _appends_stored(self) -> None:
        """Wait until every envelope handed over so far is stored (or counted as lost)."""
        self._flush_appends()
        while self._store_task is not None and not self._store_task.done():
            await self._store_task
            self._flush_appends()

    async def _store_async(self, envelopes: Sequence[Envelope]) -> None:
        """:meth:`_store` with the transaction off the event loop."""
        try:
            records = await self.outbox.append_off_loop(envelopes)
        except (OutboxError, sqlite3.Error) as err:
            self._append_failed(envelopes, err)
            return
        self._stored(records)

    def _store(self, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to the outbox. When the outbox cannot store them (a full disk that
        eviction could not relieve, a failing disk, an outbox file that cannot be replaced), the
        envelopes are lost: counted in ``append_failures`` and logged once per episode, so the
        pipeline (acquisition, alerts) keeps running rather than crashing."""
        try:
            records = self.outbox.append(envelopes)
        except (OutboxError, sqlite3.Error) as err:
            self._append_failed(envelopes, err)
            return
        self._stored(records)

    def _append_failed(self, envelopes: Sequence[Envelope], err: Exception) -> None:
        self.append_failures += len(envelopes)
        if not self._append_failing:
            self._append_failing = True
            what = "outbox full" if isinstance(err, OutboxFullError) else "outbox failed"
            log.error("%s: %s; messages are being lost (counted)", what, err)

    def _stored(self, records: Sequence[OutboxRecord]) -> None:
        if self._append_failing:
            self._append_failing = False
            log.info("outbox accepts messages again (%d lost so far)", self.append_failures)
        self.bandwidth.on_records(records or ())
        self.uplink.notify()

    def _act(self, machine: str, action: AlertAction, rule: str, alert_id: str, on: str) -> None:
        """A rule's local action: write the allowlisted register in a task; the write and its
        result go into the alert (:meth:`AlertEngine.record_action`)."""
        task = asyncio.get_running_loop().create_task(
            self._write_action(machine, action, rule, alert_id, on), name=f"alert action {rule}"
        )
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _write_action(
        self, machine: str, action: AlertAction, rule: str, alert_id: str, on: str
    ) -> None:
        value = action.value if on == "raise" else action.on_clear
        assert value is not None
        result: dict[str, Any] = {
            "on": on,
            "machine": machine,
            "register": action.register,
            "value": value,
        }
        try:
            if action.register not in self.writable:
                raise PermissionError(f"{action.register!r} is not in alerts.writable")
            poller = next(p for p in self.acquisition.pollers if p.name == machine)
            dev = next(d for d in self.cfg.devices if d.name == machine)
            reg = next(r for r in getattr(dev, "registers", ()) if r.name == action.register)
            raw = action_raw(reg, value)
            driver: Any = poller.driver
            if isinstance(raw, bool):
                await driver.write_coil(reg.address, raw)
            else:
                await driver.write_register(reg.address, raw)
            result.update(ok=True, raw=raw, address=reg.address, table=reg.table)
            log.info("alert %s on %s: wrote %s = %s (%s)", rule, machine, reg.name, value, on)
        except Exception as err:  # noqa: BLE001 - any failure is recorded in the alert
            result.update(ok=False, error=f"{type(err).__name__}: {err}")
            log.error("alert %s on %s: writing %s failed: %s", rule, machine, action.register, err)
        result["at"] = time.time()
        self.alerts.record_action(rule, machine, alert_id, result)

    async def _tick_alerts(self) -> None:
        """Judge the stale/offline alert rules and data staleness once a second."""
        while not self._stopped:
            await asyncio.sleep(1.0)
            self.alerts.tick()
            if self.quality_enabled:
                self.quality.tick()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.started_at = time.time()
        log.info(
            "appliance %s v%s starting: %d devices, model %s",
            self.cfg.appliance.id,
            __version__,
            len(self.cfg.devices),
            f"{self.bundle.name} {self.bundle.version}" if self.bundle else "none (no scoring)",
        )
        self.outbox.open()
        self.alerts.start(self.outbox)  # before the uplink takes from the outbox
        self._alert_tick = asyncio.create_task(self._tick_alerts(), name="alert-tick")
        await self.uplink.start()
        if self.api is not None:  # answers /health (and /ready: 503) while the engine loads
            await self.api.start()
        for m in self.models:
            await m.batcher.start()
            log.info(
                "model %s (%s): serving on %s — %s",
                m.name,
                m.bundle.name,
                m.engine.backend,
                m.engine.summary(),
            )
        # What start built (modules, config, engines, buffers) lives as long as the process:
        # moved out of the cyclic collector's generations, so that a full collection scans only
        # what the pipeline allocates since. At 100 devices x 50 registers a full collection
        # held the loop 50-60 ms of CPU (every ~7 s: overruns); now ~4-13 ms. No collection
        # first: it would run the finalizers of whatever garbage the process holds (a test's
        # unclosed socket) inside start; what is frozen is unfrozen at stop.
        # And full collections made ten times rarer (generation 2's threshold 10 -> 100: about
        # once a minute instead of every ~7 s at 100 devices x 50 registers, each ~15-30 ms of
        # the loop; peak RSS within ~1 MiB, docs/benchmarks.md).
        if self.freeze_gc:
            gc.freeze()
            self._froze_gc = True
            self._gc_threshold = gc.get_threshold()
            t0, t1, t2 = self._gc_threshold
            gc.set_threshold(t0, t1, max(t2, GC_GEN2_THRESHOLD))
        await self.acquisition.start()
        self.health.start()
        log.info("appliance %s running", self.cfg.appliance.id)
        self.notifier.ready(
            f"running on {self.engine.backend}" if self.engine else "running, no model"
        )

    async def stop(self, drain_timeout_s: float = 10.0, *, restarting: bool = False) -> None:
        """Stop sources first, drain, then sinks. Idempotent; bounded by ``drain_timeout_s``
        (``appliance run``: ``[appliance] drain_timeout_s``). ``restarting``: a new pipeline
        follows in this process (``config.apply``): systemd is told ``RELOADING=1``, not
        ``STOPPING=1``."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        log.info("appliance stopping: acquisition first, then draining")
        if restarting:
            self.notifier.notify("RELOADING=1")
        else:
            self.notifier.stopping()
        if self.api is not None:
            await self.api.stop()
        await self.health.stop()
        if self._actions:  # a write under way finishes (bounded by the device timeout)
            await asyncio.gather(*self._actions, return_exceptions=True)
        await self.acquisition.stop()
        if self._alert_tick is not None:
            self._alert_tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alert_tick
        self.windows.flush()
        self.telemetry.flush()
        for m in self.models:
            if m.sample_features is not None:
                m.sample_features.flush()
        for m in self.models:
            await m.batcher.drain(timeout_s=min(2.0, drain_timeout_s / 2))
        for m in self.models:
            await m.batcher.close()
            if m.previous is not None:
                m.previous.close()
        self.scores.flush()
        await self._appends_stored()
        await self.uplink.stop(drain_timeout_s=drain_timeout_s)
        self.outbox.close()
        self.alerts.close()
        await self.notifier.close()
        if self._froze_gc:  # what start froze may be garbage now (tests run many appliances)
            self._froze_gc = False
            gc.set_threshold(*self._gc_threshold)
            gc.unfreeze()
        log.info("appliance stopped")

    async def run_until_signal(self, duration_s: float | None = None) -> None:
        """Run until SIGINT/SIGTERM (or ``duration_s``), then stop cleanly."""
        await run_until_signal(
            self.start, lambda: self.stop(self.cfg.appliance.drain_timeout_s), duration_s
        )

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()`` (the local API's ``/ready``)."""
        return self._started and not self._stopped

    @property
    def outbox_failing(self) -> bool:
        """True while the outbox refuses envelopes (an ``append_failures`` episode)."""
        return self._append_failing

    def health_stats(self) -> dict[str, Any]:
        """The counters the health line reads (:mod:`appliance.runtime.health`), in the shape of
        :meth:`stats` but without what it computes (jitter percentiles, engine and bandwidth
        statistics): at 100 devices :meth:`stats` holds the event loop ~30 ms, once a second."""
        devices: list[dict[str, Any]] = []
        for p in self.acquisition.pollers:
            dev: dict[str, Any] = {
                "polls": p.polls,
                "errors": p.errors,
                "overruns": p.overruns,
                "state": p.state,
            }
            if p.waveform is not None:
                dev["waveform"] = {"errors": p.waveform.errors, "overruns": p.waveform.overruns}
            devices.append(dev)
        return {
            "acquisition": devices,
            "windows_closed": self.windows.windows_closed,
            "outbox": {"pending": self.outbox.pending},
        }

    def stats(self) -> dict[str, Any]:
        return {
            "appliance": self.cfg.appliance.id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            "frames": self.frames,
            "acquisition": self.acquisition.stats(),
            "windows_closed": self.windows.windows_closed,
            "feature_rows": self.features.rows if self.features is not None else 0,
            "incomplete_windows": (
                self.features.incomplete_windows if self.features is not None else 0
            ),
            "batcher": self.batcher.stats() if self.batcher is not None else None,  # no model
            "engine": self.engine.stats() if self.engine is not None else None,
            "models": {m.name: m.stats() for m in self.models},
            "alerts": {
                "raised": self.alerts.raised,
                "updated": self.alerts.updated,
                "suppressed": self.alerts.suppressed,
                "resent_after_restart": self.alerts.resent_after_restart,
                "state_recovered_corrupt": self.alerts.store_recovered_corrupt,
                "cleared": self.alerts.cleared,
                "active": self.alerts.active(),
            },
            "telemetry_messages": self.telemetry.messages,
            "telemetry_unchanged": self.telemetry.unchanged_reports,
            "bandwidth": self.bandwidth.stats(),
            "quality_events": self.quality.stats(),
            "outbox": {**self.outbox.stats(), "append_failures": self.append_failures},
            "uplink": self.uplink.stats(),
            **({"downlink": self.downlink_stats()} if self.downlink_stats is not None else {}),
        }
