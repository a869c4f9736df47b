"""Data-quality events per channel, on their own stream ``quality/<machine>``.

Four conditions, each with a ``begin`` and an ``end`` event (one per episode, never one per
sample), counted by kind:

* ``stale``: no good sample of a channel for ``quality.stale_s`` seconds (judged on the clock
  tick; ends with the next good sample).
* ``stuck``: a channel's good samples stayed within ``quality.stuck_tolerance`` for
  ``quality.stuck_s`` seconds (ends when it moves).
* ``out_of_range``: a good sample outside the channel's ``quality.ranges`` ``[low, high]``
  (ends with a frame whose good samples are all inside).
* ``clock_skew``: a frame's newest timestamp differs from the appliance's clock by more than
  ``quality.max_clock_skew_s`` (device-timed samples such as waveform blocks; ends when it is
  back within).

NaN and BAD values are not judged (a BAD value is what ``stale`` measures). Called on the
event loop (frames from acquisition, the tick from the supervisor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import Envelope, Frame, Priority, Quality

_GOOD = int(Quality.GOOD)

EVENT_KINDS = ("stale", "stuck", "out_of_range", "clock_skew")


@dataclass
class _Run:
    start: float
    lo: float
    hi: float


class DataQualityMonitor:
    """A frame sink with a clock tick, emitting ``quality`` envelopes."""

    def __init__(
        self,
        emit: Callable[[Sequence[Envelope]], None],
        topic_for: Callable[[str], str],
        *,
        stale_s: float = 30.0,
        stuck_s: float = 0.0,
        stuck_tolerance: float = 0.0,
        ranges: Mapping[str, Sequence[float]] | None = None,
        max_clock_skew_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._emit = emit
        self._topic_for = topic_for
        self.stale_s = stale_s
        self.stuck_s = stuck_s
        self.stuck_tolerance = stuck_tolerance
        self.ranges = {k: (float(v[0]), float(v[1])) for k, v in (ranges or {}).items()}
        self.max_clock_skew_s = max_clock_skew_s
        self._clock = clock
        self._active: set[tuple[str, str, str]] = set()  # (event, machine, channel)
        #: machine → (its channels, newest good sample time per channel; NaN: none yet)
        self._last_good: dict[str, tuple[tuple[str, ...], npt.NDArray[np.float64]]] = {}
        self._stale_active: dict[str, int] = {}  # machine → stale episodes in progress
        self._runs: dict[tuple[str, str], _Run] = {}
        self._out: list[Envelope] = []
        self.counts = dict.fromkeys(EVENT_KINDS, 0)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "active": len(self._active)}

    def on_frame(self, frame: Frame) -> None:
        machine = frame.device
        if self.max_clock_skew_s > 0 and len(frame.ts):
            newest = float(frame.ts.max())
            skew = newest - self._clock()
            self._set("clock_skew", machine, "", abs(skew) > self.max_clock_skew_s, newest, skew)
        good = (frame.quality == _GOOD) & np.isfinite(frame.value)
        if not good.all():
            if not good.any():
                self._flush()
                return
            channel, ts, value = frame.channel[good], frame.ts[good], frame.value[good]
        else:
            channel, ts, value = frame.channel, frame.ts, frame.value
        last = self._last_good.get(machine)
        if last is None or last[0] is not frame.channels:
            arr = np.full(len(frame.channels), np.nan)
            if last is not None and len(last[1]) == len(arr):
                arr[:] = last[1]
            last = self._last_good[machine] = (frame.channels, arr)
        last[1][channel] = ts  # samples are in time order: the newest of each channel wins
        if self._stale_active.get(machine):
            for ch in np.unique(channel).tolist():
                self._set("stale", machine, frame.channels[ch], False, float(last[1][ch]), 0.0)
        if self.ranges or self.stuck_s > 0:
            for ch in np.unique(channel).tolist():
                name = frame.channels[ch]
                rng = self.ranges.get(name)
                if rng is None and self.stuck_s <= 0:
                    continue
                sel = channel == ch
                values, times = value[sel], ts[sel]
                if rng is not None:
                    outside = (values < rng[0]) | (values > rng[1])
                    hit = bool(outside.any())
                    worst = float(values[outside][0]) if hit else float(values[-1])
                    self._set("out_of_range", machine, name, hit, float(times[-1]), worst)
                if self.stuck_s > 0:
                    self._stuck(machine, name, times, values)
        self._flush()

    def tick(self, now: float | None = None) -> None:
        """Judge staleness at ``now`` (default: the clock)."""
        if self.stale_s <= 0:
            return
        now = self._clock() if now is None else now
        for machine, (channels, last) in self._last_good.items():
            with np.errstate(invalid="ignore"):
                stale = np.flatnonzero(now - last > self.stale_s)
            for ch in stale.tolist():
                self._set("stale", machine, channels[ch], True, now, now - float(last[ch]))
        self._flush()

    def _stuck(
        self, machine: str, name: str, times: np.ndarray[Any, Any], values: np.ndarray[Any, Any]
    ) -> None:
        run = self._runs.get((machine, name))
        for t, v in zip(times.tolist(), values.tolist(), strict=True):
            if run is None:
                run = _Run(t, v, v)
                continue
            lo, hi = min(run.lo, v), max(run.hi, v)
            if hi - lo > self.stuck_tolerance:
                run = _Run(t, v, v)
            else:
                run.lo, run.hi = lo, hi
        assert run is not None
        self._runs[(machine, name)] = run
        flat_s = float(times[-1]) - run.start
        self._set("stuck", machine, name, flat_s >= self.stuck_s, float(times[-1]), flat_s)

    def _set(
        self, event: str, machine: str, channel: str, on: bool, ts: float, value: float
    ) -> None:
        key = (event, machine, channel)
        if on == (key in self._active):
            return
        if on:
            self._active.add(key)
            self.counts[event] += 1
        else:
            self._active.discard(key)
        if event == "stale":
            self._stale_active[machine] = self._stale_active.get(machine, 0) + (1 if on else -1)
        body: dict[str, Any] = {
            "machine": machine,
            "channel": channel or None,
            "event": event,
            "state": "begin" if on else "end",
            "value": value if math.isfinite(value) else None,
        }
        self._out.append(
            Envelope(
                stream=f"quality/{machine}",
                kind="quality",
                topic=self._topic_for(machine),
                priority=Priority.STATUS,
                ts=ts,
                body=body,
            )
        )

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._emit(out)
