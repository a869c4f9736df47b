"""What the status page shows that no counter holds: each channel's last value with its quality,
and short histories (per-window channel means, model scores) for the sparklines.

Fed on the event loop by the supervisor: ``on_frame`` (every acquired frame), ``on_window``
(every closed window) and ``on_scores`` (every scored batch). Memory is bounded: ``history_s``
of windows per machine (one point per ``window_s``).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from appliance.contracts import Frame, Quality, ScoreBatch, Window

_QUALITY = {int(q): q.name.lower() for q in Quality}


def _num(x: float) -> float | None:
    """JSON has no NaN/Inf: a missing statistic is ``null``."""
    return x if math.isfinite(x) else None


class LiveView:
    """Last values and recent history per machine. Event loop only; never raises on odd input."""

    def __init__(self, history_s: float, window_s: float) -> None:
        self.points = max(2, int(math.ceil(history_s / window_s)))
        self._last: dict[str, dict[str, tuple[float, int, float]]] = {}
        self._windows: dict[str, deque[tuple[float, tuple[str, ...], list[float | None]]]] = {}
        self._scores: dict[str, deque[tuple[float, float]]] = {}

    def on_frame(self, frame: Frame) -> None:
        n = len(frame.value)
        if n == 0:
            return
        last = self._last.setdefault(frame.device, {})
        # index of each channel's last sample in the frame (waveform frames carry many)
        _, first_in_reversed = np.unique(frame.channel[::-1], return_index=True)
        for i in (n - 1 - first_in_reversed).tolist():
            last[frame.channels[int(frame.channel[i])]] = (
                float(frame.value[i]),
                int(frame.quality[i]),
                float(frame.ts[i]),
            )

    def on_window(self, window: Window) -> None:
        hist = self._windows.get(window.machine)
        if hist is None:
            hist = self._windows[window.machine] = deque(maxlen=self.points)
        hist.append((window.end, window.channels, [_num(v) for v in window.mean.tolist()]))

    def on_scores(self, scores: ScoreBatch) -> None:
        for machine, end, score in zip(
            scores.machines, scores.window_end.tolist(), scores.score.tolist(), strict=True
        ):
            hist = self._scores.get(machine)
            if hist is None:
                hist = self._scores[machine] = deque(maxlen=self.points)
            hist.append((end, score))

    def last_values(self, device: str) -> dict[str, dict[str, Any]]:
        """``{channel: {"value", "quality", "ts"}}`` of the device's last frame per channel."""
        return {
            ch: {"value": _num(v), "quality": _QUALITY.get(q, str(q)), "ts": ts}
            for ch, (v, q, ts) in self._last.get(device, {}).items()
        }

    def history(self, machine: str) -> dict[str, Any]:
        """``{"t": [window end, ...], "channels": {name: [mean or null, ...]}, "score": {"t",
        "value"}}`` over the last ``history_s``."""
        points = list(self._windows.get(machine, ()))
        names: list[str] = []
        for _, channels, _ in points:
            for c in channels:
                if c not in names:
                    names.append(c)
        series: dict[str, list[float | None]] = {c: [] for c in names}
        for _, channels, means in points:
            row = dict(zip(channels, means, strict=False))
            for c in names:
                series[c].append(row.get(c))
        scores = list(self._scores.get(machine, ()))
        return {
            "t": [p[0] for p in points],
            "channels": series,
            "score": {"t": [s[0] for s in scores], "value": [_num(s[1]) for s in scores]},
        }

    def last_score(self, machine: str) -> float | None:
        hist = self._scores.get(machine)
        return _num(hist[-1][1]) if hist else None
