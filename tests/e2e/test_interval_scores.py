"""With `telemetry.interval_s` > 0 every window's score of the interval reaches the machine's
telemetry message (`scores` = the highest, `score_stats` n/max/mean/last), on the simulator
through Mosquitto; before, only the interval's last window's score did and the others were
counted as late."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from appliance.config import parse_config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


async def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_every_window_score_of_a_telemetry_interval_reaches_the_message(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=5)
    cfg = parse_config(
        {
            "appliance": {"id": "iv"},
            "devices": [
                {"name": f"cnc-{i + 1}", "port": p, "profile": "cnc-sim", "poll_interval_ms": 100}
                for i, p in enumerate(ports)
            ],
            "telemetry": {"interval_s": 3.0},
            "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
            "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        },
        source="iv",
        base_dir=tmp_path,
    )
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "iv", client_id="iv-sub")
    sub.keep_messages = True

    def telemetry() -> list[dict[str, object]]:
        return [m for m in sub.messages if m["kind"] == "telemetry"]

    async def go() -> None:
        await cell.start()
        sub.start()
        await app.start()
        try:
            await _wait_for(lambda: len(telemetry()) >= 6, 60, "three intervals of 2 machines")
        finally:
            await app.stop()
            await cell.stop()
        await _wait_for(lambda: len(telemetry()) == app.telemetry.messages, 10, "every message")
        sub.stop()

    asyncio.run(go())
    msgs = telemetry()
    for m in msgs:
        jsonschema.validate(m, load_schema("telemetry"))
    full = [m for m in msgs if m["window"]["end"] - m["window"]["start"] == 3.0]  # type: ignore[index]
    assert full, "no whole interval"
    # A window the loaded machine left incomplete is not scored: n may be below 3 in some
    # interval, never above it, and every scored window is in exactly one message (below).
    assert any(m["score_stats"]["cnc_anomaly"]["n"] == 3 for m in full), full  # type: ignore[index]
    for m in full:
        st = m["score_stats"]["cnc_anomaly"]  # type: ignore[index]
        assert 1 <= st["n"] <= 3, m
        assert m["scores"] == {"cnc_anomaly": st["max"]}  # type: ignore[index]
        assert st["max"] >= st["mean"] and st["max"] >= st["last"]
    scored = sum(m["score_stats"]["cnc_anomaly"]["n"] for m in msgs if "score_stats" in m)  # type: ignore[index]
    assert app.scores.late_scores == 0
    assert scored == app.stats()["batcher"]["rows_scored"]
