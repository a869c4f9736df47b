"""Flash wear (issue 10): the windows of many machines that close at the same moment are stored
in one outbox transaction (one commit, one fsync), not one per machine. Telemetry waits for its
window's scores (docs/mqtt.md `scores`), which come back in one batch: so a close costs the
transaction of the envelopes made at the close (data-quality events) and one for the telemetry
of every machine, whatever the number of machines."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np

from appliance.config import parse_config
from appliance.contracts import Frame, Quality
from appliance.infer import load_bundle
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

    def trace(sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            commits.append(sql)

    app.outbox._conn.set_trace_callback(trace)
    configure = app.outbox._configure

    def configure_traced(db: sqlite3.Connection) -> None:  # the writer thread's connection too
        configure(db)
        db.set_trace_callback(trace)

    app.outbox._configure = configure_traced  # type: ignore[method-assign]

    async def scenario() -> None:
        await app.batcher.start()  # the real engine, in its worker thread
        for ts in (10.2, 10.6, 11.1):  # the frame at 11.1 closes every machine's window [10, 11)
            for m in MACHINES:
                app._on_frame(frame(m, ts))
        for _ in range(200):  # the batch is scored within max_delay_ms (20 ms) plus inference
            await asyncio.sleep(0.01)
            if app.scores.joined >= len(MACHINES):
                break
        await asyncio.sleep(0)
        await app._appends_stored()
        await app.batcher.close()

    asyncio.run(scenario())
    streams = [r.stream for r in app.outbox.take(1000)]
    assert sorted(s for s in streams if s.startswith("telemetry/")) == sorted(
        f"telemetry/{m}" for m in MACHINES
    )
    assert 1 <= len(commits) <= 2  # the envelopes made at the close, then all telemetry with scores
    app.outbox.close()


#: every channel the shipped model reads, so that each window is complete and scored
CHANNELS = tuple(dict.fromkeys(f.channel for f in load_bundle("cnc_anomaly").features))


def frame(machine: str, ts: float) -> Frame:
    n = len(CHANNELS)
    return Frame(
        device=machine,
        channels=CHANNELS,
        ts=np.full(n, ts),
        channel=np.arange(n, dtype=np.int32),
        value=np.full(n, 40.0),
        quality=np.full(n, int(Quality.GOOD), dtype=np.uint8),
    )
