"""Issue 10: the disk budget covers the WAL; records carry a CRC32 and a damaged one is
quarantined, never published; message ids stay unique across outbox files; eviction and
coarsening are counted in windows too."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox

APP = "app-01"


def telemetry(machine: str = "cnc-1", pad: str = "") -> Envelope:
    return Envelope(
        f"telemetry/{machine}",
        "telemetry",
        f"edge/{APP}/telemetry/{machine}",
        Priority.TELEMETRY,
        1.0,
        {
            "window_s": 1.0,
            "channels": {"t": {"n": 10, "mean": 1.0, "min": 0.0, "max": 2.0}},
            "pad": pad,
        },
    )


def test_the_disk_budget_covers_the_wal(tmp_path: Path) -> None:
    budget_mb = 0.5
    path = tmp_path / "o.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP, disk_budget_mb=budget_mb) as ob:
        peak = 0
        for _ in range(200):
            ob.append([telemetry(m, pad="x" * 300) for m in ("a", "b", "c", "d")])
            files = [path, Path(f"{path}-wal")]
            used = ob._used_bytes(ob._conn) + os.path.getsize(files[1])
            peak = max(peak, used)
        assert ob.stats()["evicted"] + ob.stats()["coarsened"] > 0  # the budget was reached
    assert peak <= budget_mb * 2**20
