"""Turn closed windows into telemetry envelopes (per-channel summary statistics).

One message per machine per telemetry interval on the stream ``telemetry/<machine>``: every
model window (``interval_s = 0``), or the windows of ``interval_s`` seconds (aligned to
wall-clock multiples of it) merged into one aggregate: ``n`` summed, ``min``/``max`` the
extremes, ``mean`` weighted by ``n``, ``rms`` the root of the weighted mean square, ``last``
the newest value, ``std`` the population standard deviation of all good samples (from each
window's mean and mean square). The stream's sequence number (given by the outbox) lets
subscribers see that no message is missing. A channel with no
good sample in the window is sent with ``n: 0`` and null statistics, never silently omitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from appliance.contracts import Envelope, Priority, Window


def _num(x: float) -> float | None:
    """The statistic as sent: ``None`` for NaN, else the value itself. Never rounded: JSON
    encoding writes the shortest decimal that reads back as the same float64, so a 3e-06 W
    channel keeps all its significant digits."""
    return None if math.isnan(x) else float(x)


def _std(window: Window) -> np.ndarray:
    """Population standard deviation per channel from the window's mean and rms."""
    with np.errstate(invalid="ignore"):
        var = np.maximum(window.rms * window.rms - window.mean * window.mean, 0.0)
    out: np.ndarray = np.sqrt(var)
    return out


def merge_windows(windows: Sequence[Window]) -> tuple[Window, np.ndarray]:
    """One window (and its std per channel) covering ``windows`` of one machine, in order,
    sharing one channel tuple. Channels without good samples stay NaN with ``n = 0``."""
    first, last_w = windows[0], windows[-1]
    if len(windows) == 1:
        return first, _std(first)
    n = np.sum([w.count for w in windows], axis=0).astype(np.int32)
    counts = [w.count.astype(np.float64) for w in windows]
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(n > 0, n, 1).astype(np.float64)
        mean = np.nansum([c * w.mean for c, w in zip(counts, windows, strict=True)], axis=0) / total
        msq = np.nansum([c * w.rms * w.rms for c, w in zip(counts, windows, strict=True)], axis=0)
        msq = msq / total
    empty = n == 0
    mean[empty] = np.nan
    msq[empty] = np.nan
    stack_min = np.array([w.min for w in windows])
    stack_max = np.array([w.max for w in windows])
    lo = np.full(len(n), np.nan)
    hi = np.full(len(n), np.nan)
    last = np.full(len(n), np.nan)
    for w, smin, smax in zip(windows, stack_min, stack_max, strict=True):
        lo = np.fmin(lo, smin)
        hi = np.fmax(hi, smax)
        last = np.where(np.isnan(w.last), last, w.last)
    with np.errstate(invalid="ignore"):
        var = np.maximum(msq - mean * mean, 0.0)
    merged = Window(
        first.machine, first.start, last_w.end, first.channels, n, mean, np.sqrt(msq), lo, hi, last
    )
    return merged, np.sqrt(var)


class TelemetryDownsampler:
    """Window sink producing telemetry envelopes. Called on the event loop.

    ``interval_s``: seconds per telemetry message (0: one per model window); windows of a
    machine are held until a window ends on a multiple of it, then sent merged
    (:func:`merge_windows`). ``flush()`` sends what is held (at stop). ``deadband``: channel →
    band (its unit): such a channel is reported by exception (:meth:`_within_deadband`), at
    least every ``max_silence_s``."""

    def __init__(
        self,
        stats: Sequence[str],
        emit: Callable[[Sequence[Envelope]], None],
        topic_for: Callable[[str], str],
        interval_s: float = 0.0,
        deadband: Mapping[str, float] | None = None,
        max_silence_s: float = 300.0,
    ) -> None:
        self.stats = tuple(stats)
        self._emit = emit
        self._topic_for = topic_for
        self.interval_s = interval_s
        self.deadband = dict(deadband or {})
        self.max_silence_s = max_silence_s
        self._reported: dict[tuple[str, str], tuple[float, float]] = {}  # mean, end
        self.unchanged_reports = 0
        self._held: dict[str, list[Window]] = {}
        self.messages = 0

    def __call__(self, window: Window) -> None:
        if self.interval_s <= 0:
            self._send([window])
            return
        held = self._held.setdefault(window.machine, [])
        if held and held[0].channels != window.channels:
            self._send(held)
            held = self._held[window.machine] = []
        held.append(window)
        step = window.end / self.interval_s
        if abs(step - round(step)) < 1e-6 or window.end - held[0].start >= self.interval_s:
            self._send(held)
            self._held[window.machine] = []

    def _within_deadband(self, window: Window, i: int) -> bool:
        """Report by exception: channel ``i`` of a deadband channel is left out (named in
        ``unchanged``) while every good sample of the interval stayed within ``deadband`` of
        the mean last reported and ``max_silence_s`` has not passed since that report."""
        name = window.channels[i]
        band = self.deadband.get(name)
        if band is None:
            return False
        key = (window.machine, name)
        ref = self._reported.get(key)
        n = int(window.count[i])
        lo, hi, mean = float(window.min[i]), float(window.max[i]), float(window.mean[i])
        if (
            ref is not None
            and n > 0
            and window.end - ref[1] < self.max_silence_s
            and max(abs(lo - ref[0]), abs(hi - ref[0])) <= band
        ):
            return True
        if n > 0:
            self._reported[key] = (mean, window.end)
        return False

    def flush(self) -> None:
        """Send every machine's held windows (a shorter last interval)."""
        for machine, held in list(self._held.items()):
            if held:
                self._send(held)
            self._held[machine] = []

    def _send(self, windows: Sequence[Window]) -> None:
        window, std = merge_windows(windows)
        columns = {s: (std if s == "std" else getattr(window, s)).tolist() for s in self.stats}
        counts = window.count.tolist()
        channels: dict[str, dict[str, float | int | None]] = {}
        unchanged: list[str] = []
        for i, name in enumerate(window.channels):
            if self._within_deadband(window, i):
                unchanged.append(name)
                continue
            entry: dict[str, float | int | None] = {"n": counts[i]}
            for s in self.stats:
                entry[s] = _num(columns[s][i])
            channels[name] = entry
        body: dict[str, object] = {
            "machine": window.machine,
            "window": {"start": window.start, "end": window.end},
            "channels": channels,
        }
        if unchanged:
            body["unchanged"] = unchanged
            self.unchanged_reports += len(unchanged)
        self.messages += 1
        self._emit(
            [
                Envelope(
                    stream=f"telemetry/{window.machine}",
                    kind="telemetry",
                    topic=self._topic_for(window.machine),
                    priority=Priority.TELEMETRY,
                    ts=window.end,
                    body=body,
                )
            ]
        )
