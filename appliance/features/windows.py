"""Tumbling windows per machine (columnar, numpy) and feature rows laid out by a model manifest.

Windows are aligned to wall-clock multiples of ``window_s`` (a window covers
``[k*window_s, (k+1)*window_s)``), so windows of different machines end at the same instants and
their feature rows batch together. A window closes when the first frame of a later window
arrives, or on :meth:`WindowAggregator.flush` at shutdown. Only GOOD-quality values enter the
statistics; a channel without a good value in a window has ``count == 0`` and NaN statistics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from appliance.contracts import FEATURE_STATS as STATS
from appliance.contracts import FeatureRow, FeatureSpec, Frame, Quality, Window, WindowSink

log = logging.getLogger(__name__)


class _Acc:
    """Running sums of one open window of one machine."""

    __slots__ = ("channels", "start", "end", "count", "sum", "sumsq", "min", "max", "last")

    def __init__(self, channels: tuple[str, ...], start: float, end: float) -> None:
        n = len(channels)
        self.channels = channels
        self.start = start
        self.end = end
        self.count = np.zeros(n, np.int64)
        self.sum = np.zeros(n)
        self.sumsq = np.zeros(n)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.last = np.full(n, np.nan)

    def add(self, frame: Frame) -> None:
        good = (frame.quality == Quality.GOOD) & np.isfinite(frame.value)  # NaN/Inf: missing
        ch = frame.channel[good]
        v = frame.value[good]
        if ch.size == 0:
            return
        n = len(self.channels)
        self.count += np.bincount(ch, minlength=n)
        self.sum += np.bincount(ch, weights=v, minlength=n)
        self.sumsq += np.bincount(ch, weights=v * v, minlength=n)
        np.minimum.at(self.min, ch, v)
        np.maximum.at(self.max, ch, v)
        self.last[ch] = v  # later samples of a channel overwrite earlier ones

    def close(self, machine: str) -> Window:
        with np.errstate(invalid="ignore", divide="ignore"):
            cnt = self.count.astype(np.float64)
            mean = self.sum / cnt
            rms = np.sqrt(self.sumsq / cnt)
        empty = self.count == 0
        mn = np.where(empty, np.nan, self.min)
        mx = np.where(empty, np.nan, self.max)
        return Window(
            machine=machine,
            start=self.start,
            end=self.end,
            channels=self.channels,
            count=self.count.astype(np.int32),
            mean=mean,
            rms=rms,
            min=mn,
            max=mx,
            last=self.last.copy(),
        )


class WindowAggregator:
    """Frame sink that turns each machine's frames into tumbling windows.

    Called on the event loop (``on_frame`` from the acquisition tasks). Every closed window is
    passed to each of ``sinks`` in order. Frames older than the open window (clock steps back)
    are counted in ``late_frames`` and folded into the open window rather than dropped.
    """

    def __init__(self, window_s: float, sinks: Sequence[WindowSink]) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._sinks = list(sinks)
        self._open: dict[str, _Acc] = {}
        self.windows_closed = 0
        self.late_frames = 0

    def _bounds(self, ts: float) -> tuple[float, float]:
        k = math.floor(ts / self.window_s)
        return k * self.window_s, (k + 1) * self.window_s

    def on_frame(self, frame: Frame) -> None:
        if frame.ts.size == 0:
            return
        first, last = self._bounds(float(frame.ts[0])), self._bounds(float(frame.ts[-1]))
        if first != last or frame.ts.size > 2 and not self._one_window(frame.ts):
            self._split(frame)
            return
        self._add(frame)

    def _one_window(self, ts: npt.NDArray[np.float64]) -> bool:
        k = np.floor(ts / self.window_s)
        return bool(k.min() == k.max())

    def _split(self, frame: Frame) -> None:
        """A frame spanning several windows (a waveform block read across a boundary): each
        window gets exactly its own samples, oldest window first."""
        k = np.floor(frame.ts / self.window_s)
        for kk in np.unique(k):
            m = k == kk
            self._add(
                Frame(
                    frame.device,
                    frame.channels,
                    frame.ts[m],
                    frame.channel[m],
                    frame.value[m],
                    frame.quality[m],
                )
            )

    def _add(self, frame: Frame) -> None:
        ts = float(frame.ts[-1])
        acc = self._open.get(frame.device)
        if acc is not None and (ts >= acc.end or acc.channels is not frame.channels):
            self._emit(frame.device, acc)
            acc = None
        if acc is None:
            start, end = self._bounds(ts)
            acc = self._open[frame.device] = _Acc(frame.channels, start, end)
        elif ts < acc.start:
            self.late_frames += 1
        acc.add(frame)

    def _emit(self, machine: str, acc: _Acc) -> None:
        del self._open[machine]
        window = acc.close(machine)
        self.windows_closed += 1
        for sink in self._sinks:
            sink(window)

    def flush(self) -> None:
        """Close every open window now (at shutdown, so the last partial window is not lost)."""
        for machine in list(self._open):
            self._emit(machine, self._open[machine])


class FeatureBuilder:
    """Window sink that lays a window out as the model's feature vector (manifest order).

    A window missing any channel the model needs is not scored: it is counted in
    ``incomplete_windows`` (the telemetry for it is still published) and logged once per machine.
    """

    def __init__(self, features: Sequence[FeatureSpec], emit: Callable[[FeatureRow], None]) -> None:
        for f in features:
            if f.stat not in STATS:
                raise ValueError(f"feature {f.channel}:{f.stat}: stat must be one of {STATS}")
        self.features = tuple(features)
        self._emit = emit
        self._index_cache: dict[tuple[str, ...], np.ndarray | None] = {}
        self._warned: set[str] = set()
        self.rows = 0
        self.incomplete_windows = 0

    def _indices(self, channels: tuple[str, ...]) -> np.ndarray | None:
        if channels not in self._index_cache:
            pos = {name: i for i, name in enumerate(channels)}
            if all(f.channel in pos for f in self.features):
                self._index_cache[channels] = np.array([pos[f.channel] for f in self.features])
            else:
                self._index_cache[channels] = None
        return self._index_cache[channels]

    def __call__(self, window: Window) -> None:
        idx = self._indices(window.channels)
        if idx is None:
            self._incomplete(window, "device lacks channels the model needs")
            return
        stats = {s: getattr(window, s) for s in STATS}
        vec = np.fromiter(
            (stats[f.stat][i] for f, i in zip(self.features, idx, strict=False)),
            dtype=np.float32,
            count=len(self.features),
        )
        if not np.all(np.isfinite(vec)):
            self._incomplete(window, "a channel had no good sample in the window")
            return
        self.rows += 1
        self._emit(FeatureRow(window.machine, window.end, vec))

    def _incomplete(self, window: Window, why: str) -> None:
        self.incomplete_windows += 1
        if window.machine not in self._warned:
            self._warned.add(window.machine)
            log.warning("machine %s: window not scored: %s", window.machine, why)
