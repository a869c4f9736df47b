"""``appliance record``: write the raw values the appliance polls, one CSV file per machine.

Each file (``<out>/<machine>.csv``) has a ``time`` column (seconds since the UNIX epoch, as
acquired) and one column per channel of the device, in the device's channel order. One row per
distinct sample time: a poll group's values share a row, waveform samples get a row each, and a
channel without a GOOD value at that time has an empty cell. Values are written exactly
(``repr`` of the float64, never rounded). ``appliance model fit`` and ``model eval`` read these
files (:mod:`appliance.modelkit.recording`).
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
from appliance.config import Config
from appliance.contracts import Frame, Quality

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


async def record(cfg: Config, out_dir: str | Path, duration_s: float) -> Recorder:
    """Poll ``cfg``'s devices for ``duration_s`` seconds, writing every value to ``out_dir``."""
    rec = Recorder(out_dir)
    acq = Acquisition(cfg.devices, rec.on_frame)
    try:
        await acq.start()
        await asyncio.sleep(duration_s)
    finally:
        await acq.stop()
        rec.close()
    log.info("recorded %d rows into %s", rec.rows, out_dir)
    return rec
