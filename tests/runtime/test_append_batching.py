"""Flash wear (issue 10): the windows of many machines that close at the same moment are stored
in one outbox transaction (one commit, one fsync), not one per machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from appliance.config import parse_config
from appliance.contracts import Frame, Quality
from appliance.runtime import Appliance

MACHINES = [f"cnc-{i}" for i in range(12)]


def test_one_close_of_many_machines_windows_is_one_transaction(tmp_path: Path) -> None:
    data = {
        "devices": [{"name": m, "profile": "cnc-sim"} for m in MACHINES],
        "outbox": {"path": "o.sqlite"},
    }
    app = Appliance(parse_config(data, source="t", base_dir=tmp_path))
    app.outbox.open()
    commits: list[str] = []
    app.outbox._conn.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )

    async def scenario() -> None:
        for ts in (10.2, 10.6, 11.1):  # the frame at 11.1 closes every machine's window [10, 11)
            for m in MACHINES:
                app._on_frame(frame(m, ts))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    streams = [r.stream for r in app.outbox.take(1000)]
    assert sorted(s for s in streams if s.startswith("telemetry/")) == sorted(
        f"telemetry/{m}" for m in MACHINES
    )
    assert len(commits) == 1  # every envelope of that close (telemetry, quality events) at once
    app.outbox.close()


def frame(machine: str, ts: float) -> Frame:
    return Frame(
        device=machine,
        channels=("spindle_temp",),
        ts=np.array([ts]),
        channel=np.array([0], dtype=np.int32),
        value=np.array([40.0]),
        quality=np.array([int(Quality.GOOD)], dtype=np.uint8),
    )
