"""CSV replay: recorded machine data served through the simulator's registers (pure after load).

A CSV file with a header row; one column holds the time of each row, either seconds (any
origin, e.g. ``0.0, 0.1, ...``) or ISO 8601 timestamps (``2026-03-01T08:00:00.250``). A map
names, for each replayed column, the model channel (= register of the served profile) it
drives: ``{"spindle_rpm": "spindle_speed", "vib": "vibration_rms"}``. Channels the map does not
name keep coming from the machine model.

Replay time is the cell's simulated time since start (``--time-scale`` fast-forwards a replay
too): a channel holds the value of the last row at or before it (sample and hold, the way a
device's register holds its last measurement). At the end the recording loops: one period is
the recorded span plus the median row interval, so the first row follows the last one after a
normal step. Empty cells hold the column's previous value (the first row must be complete).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.simulate.machine import CHANNELS

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Replay:
    """A loaded recording: row times ``t_s`` (seconds from the first row, increasing), the
    value series of each mapped channel, and the loop ``period_s`` (seconds)."""

    t_s: F64
    channels: dict[str, F64]
    period_s: float
    source: str = ""

    def values_at(self, t: float) -> dict[str, float]:
        """The mapped channels' values at replay time ``t`` (seconds since start; loops)."""
        tm = t % self.period_s
        i = max(int(np.searchsorted(self.t_s, tm, side="right")) - 1, 0)
        return {name: float(series[i]) for name, series in self.channels.items()}


def parse_map(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["column=channel", ...]`` → ``{column: channel}``; ``ValueError`` on a bad entry."""
    out: dict[str, str] = {}
    for spec in specs:
        column, sep, channel = spec.partition("=")
        column, channel = column.strip(), channel.strip()
        if not sep or not column or not channel:
            raise ValueError(f"map entry {spec!r} is not COLUMN=REGISTER")
        if column in out:
            raise ValueError(f"map entry {spec!r}: column {column!r} is mapped twice")
        out[column] = channel
    return out


def _time_of(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()


def load_replay(
    path: str | Path, mapping: Mapping[str, str], time_column: str | None = None
) -> Replay:
    """Read ``path`` and keep the columns of ``mapping`` (CSV column → model channel).

    ``time_column`` defaults to the first column. Raises ``ValueError`` naming the file, row
    and column for anything unusable (unknown column or channel, a channel mapped twice, a
    non-number, times that do not increase, fewer than two rows). Reads the file (I/O) once.
    """
    where = str(path)
    if not mapping:
        raise ValueError(f"{where}: the replay map is empty (give COLUMN=REGISTER entries)")
    targets = list(mapping.values())
    for column, channel in mapping.items():
        if channel not in CHANNELS:
            raise ValueError(
                f"{where}: map {column}={channel}: {channel!r} is not a register of the "
                f"simulator ({', '.join(CHANNELS)})"
            )
        if targets.count(channel) > 1:
            raise ValueError(f"{where}: register {channel!r} is mapped from several columns")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{where}: empty file") from None
        tcol = time_column or header[0]
        if tcol not in header:
            raise ValueError(f"{where}: no time column {tcol!r} (columns: {header})")
        for column in mapping:
            if column not in header:
                raise ValueError(f"{where}: no column {column!r} (columns: {header})")
        ti = header.index(tcol)
        idx = {column: header.index(column) for column in mapping}
        times: list[float] = []
        series: dict[str, list[float]] = {column: [] for column in mapping}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                times.append(_time_of(row[ti]))
            except (ValueError, IndexError):
                raise ValueError(f"{where}:{lineno}: column {tcol!r}: not a time") from None
            for column, j in idx.items():
                cell = row[j].strip() if j < len(row) else ""
                if not cell:
                    if not series[column]:
                        raise ValueError(f"{where}:{lineno}: column {column!r}: empty first value")
                    series[column].append(series[column][-1])
                    continue
                try:
                    series[column].append(float(cell))
                except ValueError:
                    raise ValueError(
                        f"{where}:{lineno}: column {column!r}: {cell!r} is not a number"
                    ) from None
    if len(times) < 2:
        raise ValueError(f"{where}: a replay needs at least two rows, got {len(times)}")
    t = np.asarray(times, dtype=np.float64)
    steps = np.diff(t)
    if not np.all(steps > 0):
        bad = int(np.argmax(steps <= 0)) + 3
        raise ValueError(f"{where}:{bad}: time does not increase")
    t -= t[0]
    period = float(t[-1] + np.median(steps))
    return Replay(
        t_s=t,
        channels={mapping[c]: np.asarray(v, dtype=np.float64) for c, v in series.items()},
        period_s=period,
        source=where,
    )
