"""Turn each closed window into a telemetry envelope (per-channel summary statistics).

One message per machine per window on the stream ``telemetry/<machine>``; the stream's sequence
number (given by the outbox) lets subscribers see that no window is missing. A channel with no
good sample in the window is sent with ``n: 0`` and null statistics, never silently omitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from appliance.contracts import Envelope, Priority, Window


def _num(x: float) -> float | None:
    """The statistic as sent: ``None`` for NaN, else the value itself. Never rounded: JSON
    encoding writes the shortest decimal that reads back as the same float64, so a 3e-06 W
    channel keeps all its significant digits."""
    return None if math.isnan(x) else float(x)


class TelemetryDownsampler:
    """Window sink producing telemetry envelopes. Called on the event loop."""

    def __init__(
        self,
        stats: Sequence[str],
        emit: Callable[[Sequence[Envelope]], None],
        topic_for: Callable[[str], str],
    ) -> None:
        self.stats = tuple(stats)
        self._emit = emit
        self._topic_for = topic_for
        self.messages = 0

    def __call__(self, window: Window) -> None:
        columns = {s: getattr(window, s).tolist() for s in self.stats}
        counts = window.count.tolist()
        channels: dict[str, dict[str, float | int | None]] = {}
        for i, name in enumerate(window.channels):
            entry: dict[str, float | int | None] = {"n": counts[i]}
            for s in self.stats:
                entry[s] = _num(columns[s][i])
            channels[name] = entry
        body = {
            "machine": window.machine,
            "window": {"start": window.start, "end": window.end},
            "channels": channels,
        }
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
