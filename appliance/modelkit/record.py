"""``appliance record``: write the raw values the appliance polls, one CSV file per machine.

Each file (``<out>/<machine>.csv``) has a ``time`` column (seconds since the UNIX epoch, as
acquired) and one column per channel of the device, in the device's channel order. One row per
distinct sample time: a poll group's values share a row, waveform samples get a row each, and a
channel without a GOOD value at that time has an empty cell. Values are written exactly
(``repr`` of the float64, never rounded). ``appliance model fit`` and ``model eval`` read these
files (:mod:`appliance.modelkit.recording`).

With ``scores`` (``appliance record --scores``) the configured models (``engine.model`` or
``[[models]]``) also score the polled values as ``appliance run`` does (the same feature
builders, batcher and engine), and each window's scores are kept beside the values, in
``<out>/scores/<machine>.csv`` (a subfolder: ``<out>/*.csv`` stays the recordings):
``window_end, model, bundle, version, score``, one row per scored window and model. ``model
eval`` of such a recording compares the scores it computes with these (``live`` in its
report): the evaluation measures what the appliance serves.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from appliance.acquire import Acquisition
from appliance.batch import Batcher
from appliance.config import Config
from appliance.contracts import FeatureRow, Frame, Quality, ScoreBatch
from appliance.features import FeatureBuilder, WindowAggregator
from appliance.features.samples import SampleFeatureBuilder
from appliance.infer import EngineOptions, ServingEngine
from appliance.infer.drift import DriftStage
from appliance.runtime.checks import ServedModel, served_models

#: Subfolder of the kept scores (``rec/cnc-1.csv`` → ``rec/scores/cnc-1.csv``).
SCORES_DIR = "scores"
SCORES_HEADER = ("window_end", "model", "bundle", "version", "score")

log = logging.getLogger(__name__)


class Recorder:
    """Frame sink writing CSV rows per machine. Called on the event loop; ``close()`` once."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._files: dict[str, tuple[io.TextIOWrapper, Any, tuple[str, ...]]] = {}
        self.rows = 0

    def on_frame(self, frame: Frame) -> None:
        good = frame.quality == Quality.GOOD
        if not good.any():
            return
        entry = self._files.get(frame.device)
        if entry is None or entry[2] is not frame.channels:
            if entry is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                f = (self.out_dir / f"{frame.device}.csv").open("w", newline="", encoding="utf-8")
                w = csv.writer(f)
                w.writerow(["time", *frame.channels])
            else:
                f, w, _ = entry
            entry = self._files[frame.device] = (f, w, frame.channels)
        _, writer, channels = entry
        ts, inv = np.unique(frame.ts[good], return_inverse=True)
        grid = np.full((ts.size, len(channels)), np.nan)
        grid[inv, frame.channel[good]] = frame.value[good]
        for t, row in zip(ts.tolist(), grid.tolist(), strict=True):
            writer.writerow([repr(t), *("" if v != v else repr(v) for v in row)])
        self.rows += ts.size

    def close(self) -> None:
        for f, _, _ in self._files.values():
            f.close()
        self._files.clear()


class _ScoredModel:
    """One configured model scoring the recorded frames, wired as the supervisor wires it."""

    def __init__(self, served: ServedModel, cfg: Config, machines: list[str], sink: ScoreSink):
        self.served = served
        self.machines = frozenset(served.machines or machines)
        b = served.bundle
        self.engine = ServingEngine(b, cfg.engine.backend, EngineOptions.from_config(cfg, b))
        self.batcher = Batcher(
            self.engine,
            lambda batch: sink.on_scores(served, batch),
            max_batch=cfg.batch.max_batch,
            max_delay_ms=cfg.batch.max_delay_ms,
            queue_size=cfg.batch.queue_size,
        )
        self.window_features: FeatureBuilder | None = None
        self.sample_features: SampleFeatureBuilder | None = None
        #: the per-machine self-baseline stage (manifest ``baseline``), as ``appliance run``
        self.drift = DriftStage(b.drift) if b.drift is not None else None
        self._emit = (
            self.batcher.submit if self.drift is None else self.drift.wrap(self.batcher.submit)
        )
        if b.needs_samples:
            self.sample_features = SampleFeatureBuilder(
                b.window_s, b.features, self._submit, b.condition
            )
        else:
            self.window_features = FeatureBuilder(b.features, self._submit)

    def _submit(self, row: FeatureRow) -> None:
        if row.machine in self.machines:
            self._emit(row)


class ScoreSink:
    """Writes ``scores/<machine>.csv`` rows. Called on the event loop; ``close()`` once."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._files: dict[str, tuple[io.TextIOWrapper, Any]] = {}
        self.rows = 0

    def on_scores(self, served: ServedModel, batch: ScoreBatch) -> None:
        ends, scores = batch.window_end.tolist(), batch.score.tolist()
        for machine, end, score in zip(batch.machines, ends, scores, strict=True):
            entry = self._files.get(machine)
            if entry is None:
                (self.out_dir / SCORES_DIR).mkdir(parents=True, exist_ok=True)
                path = self.out_dir / SCORES_DIR / f"{machine}.csv"
                f = path.open("w", newline="", encoding="utf-8")
                entry = self._files[machine] = (f, csv.writer(f))
                entry[1].writerow(SCORES_HEADER)
            b = served.bundle
            entry[1].writerow([repr(end), served.name, b.name, b.version, repr(score)])
            self.rows += 1

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


async def record(
    cfg: Config, out_dir: str | Path, duration_s: float, *, scores: bool = False
) -> Recorder:
    """Poll ``cfg``'s devices for ``duration_s`` seconds, writing every value to ``out_dir``;
    with ``scores``, also the configured models' scores of every window (module docstring)."""
    rec = Recorder(out_dir)
    sink = ScoreSink(Path(out_dir))
    machines = [d.name for d in cfg.devices]
    models = [_ScoredModel(m, cfg, machines, sink) for m in served_models(cfg)] if scores else []
    windows = WindowAggregator(
        cfg.features.window_s, [m.window_features for m in models if m.window_features]
    )

    def on_frame(frame: Frame) -> None:
        rec.on_frame(frame)
        if models:
            windows.on_frame(frame)
            for m in models:
                if m.sample_features is not None:
                    m.sample_features.on_frame(frame)

    acq = Acquisition(cfg.devices, on_frame)
    try:
        for m in models:
            await m.batcher.start()
        await acq.start()
        await asyncio.sleep(duration_s)
    finally:
        await acq.stop()
        for m in models:
            await m.batcher.drain()
            await m.batcher.close()
        rec.close()
        sink.close()
    log.info("recorded %d rows and %d scores into %s", rec.rows, sink.rows, out_dir)
    return rec
