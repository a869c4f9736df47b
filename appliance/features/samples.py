"""Feature rows from the raw samples of tumbling windows (for models with sample features).

A model whose manifest names a statistic that the aggregate :class:`~appliance.contracts.Window`
does not hold (``std``, ``kurtosis``, ``band:…``, see
:data:`~appliance.contracts.SAMPLE_FEATURE_STATS`) needs the window's samples.
:class:`SampleFeatureBuilder` is a frame sink that keeps the GOOD samples of each machine's open
window (aligned to wall-clock multiples of ``window_s`` like
:class:`~appliance.features.windows.WindowAggregator`, so rows of different machines batch
together) and, when the window closes, computes the manifest's vector with
:func:`~appliance.features.extract.window_features`, the function the training used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureRow, FeatureSpec, Frame, Quality
from appliance.features.extract import check_specs, window_features

#: A scoring condition: (feature, min, max); a window is scored when min <= value <= max.
Condition = tuple[FeatureSpec, float, float]


def in_condition(values: npt.NDArray[np.float32], condition: Sequence[Condition]) -> bool:
    """Whether every condition feature value lies in its range (NaN: not inside)."""
    return all(lo <= float(v) <= hi for v, (_, lo, hi) in zip(values, condition, strict=True))


log = logging.getLogger(__name__)


class _Open:
    __slots__ = ("channels", "start", "end", "parts")

    def __init__(self, channels: tuple[str, ...], start: float, end: float) -> None:
        self.channels = channels
        self.start = start
        self.end = end
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


class SampleFeatureBuilder:
    """Frame sink → :class:`FeatureRow` per machine window, from the window's raw samples.

    Called on the event loop (``on_frame``). A window whose vector is not finite (a channel
    without a good sample, a device lacking a channel the model needs) is not scored: counted in
    ``incomplete_windows`` and logged once per machine. Each machine's first window is partial
    (acquisition started inside it) and not scored either (``partial_windows``; off with
    ``skip_first=False``), so a start does not look like an anomaly.
    """

    def __init__(
        self,
        window_s: float,
        features: Sequence[FeatureSpec],
        emit: Callable[[FeatureRow], None],
        condition: Sequence[Condition] = (),
        *,
        skip_first: bool = True,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        check_specs(features)
        check_specs([c[0] for c in condition])
        self.window_s = window_s
        self.features = tuple(features)
        self.condition = tuple(condition)
        self._all = self.features + tuple(c[0] for c in condition)
        self._emit = emit
        #: windows outside the model's condition (e.g. spindle stopped): not scored, by design
        self.unscored_windows = 0
        #: each machine's first window: it began before acquisition did, so it holds only part
        #: of the window's samples and its std, min, max, spectrum are not those of a window
        self.partial_windows = 0
        self._skip_first = skip_first
        self._seen: set[str] = set()
        self._open: dict[str, _Open] = {}
        self._warned: set[str] = set()
        self.rows = 0
        self.incomplete_windows = 0
        self.windows_closed = 0

    def on_frame(self, frame: Frame) -> None:
        if frame.ts.size == 0:
            return
        k = np.floor(frame.ts / self.window_s)
        if k[0] == k[-1] and (k.size <= 2 or k.min() == k.max()):
            self._add(frame, float(k[0]), slice(None))
            return
        for kk in np.unique(k):
            self._add(frame, float(kk), k == kk)

    def _add(self, frame: Frame, k: float, sel: slice | npt.NDArray[np.bool_]) -> None:
        start, end = k * self.window_s, (k + 1) * self.window_s
        acc = self._open.get(frame.device)
        if acc is not None and (start >= acc.end or acc.channels is not frame.channels):
            self._close(frame.device)
            acc = None
        if acc is None:
            acc = self._open[frame.device] = _Open(frame.channels, start, end)
        good = frame.quality[sel] == Quality.GOOD
        acc.parts.append((frame.ts[sel][good], frame.channel[sel][good], frame.value[sel][good]))

    def _close(self, machine: str) -> None:
        acc = self._open.pop(machine)
        self.windows_closed += 1
        if self._skip_first and machine not in self._seen:
            self._seen.add(machine)
            self.partial_windows += 1
            return
        if acc.parts:
            ts = np.concatenate([p[0] for p in acc.parts])
            ch = np.concatenate([p[1] for p in acc.parts])
            val = np.concatenate([p[2] for p in acc.parts])
        else:
            ts, ch, val = np.empty(0), np.empty(0, np.int32), np.empty(0)
        allvec = window_features(self._all, acc.channels, ts, ch, val)
        nf = len(self.features)
        vec = allvec[:nf]
        if self.condition and not in_condition(allvec[nf:], self.condition):
            self.unscored_windows += 1
            return
        if not np.all(np.isfinite(vec)):
            self.incomplete_windows += 1
            if machine not in self._warned:
                self._warned.add(machine)
                missing = sorted({f.channel for f in self.features} - set(acc.channels))
                why = (
                    f"device lacks channels the model needs: {', '.join(missing)}"
                    if missing
                    else "a channel had no good sample in the window (or, for a spectrogram, "
                    "too few samples or another sample rate than the model's)"
                )
                log.warning("machine %s: window not scored: %s", machine, why)
            return
        self.rows += 1
        self._emit(FeatureRow(machine, acc.end, vec))

    def flush(self) -> None:
        """Close every open window now (at shutdown, so the last partial window is not lost)."""
        for machine in list(self._open):
            self._close(machine)


def features_from_frames(
    frames: Iterable[Frame],
    features: Sequence[FeatureSpec],
    window_s: float,
    *,
    drop_edges: bool = True,
    condition: Sequence[Condition] = (),
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32], int]:
    """Window end times and feature matrix of a frame stream (one machine), as served.

    Returns ``(window_end [W], X [W, F], incomplete)`` of the windows serving would score
    (complete, inside ``condition``); with ``drop_edges`` (as serving does) the first window
    and the last, still open one (both usually partial) are left out.
    """
    rows: list[FeatureRow] = []
    fb = SampleFeatureBuilder(window_s, features, rows.append, condition, skip_first=drop_edges)
    for frame in frames:
        fb.on_frame(frame)
    if not drop_edges:
        fb.flush()
    ends = np.array([r.window_end for r in rows], dtype=np.float64)
    x = (
        np.vstack([r.vector for r in rows])
        if rows
        else np.empty((0, len(features)), dtype=np.float32)
    )
    return ends, x, fb.incomplete_windows
