"""With `telemetry.interval_s` > 0 every window's score of the interval reaches the machine's
telemetry message (`scores` = the highest, `score_stats` n/max/mean/last), on the simulator
through Mosquitto; before, only the interval's last window's score did and the others were
counted as late."""

from __future__ import annotations

import asyncio
from pathlib import Path

import jsonschema
import pytest
from cellhelp import cell_config, serving, wait_for

from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


def test_every_window_score_of_a_telemetry_interval_reaches_the_message(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=5)
    cfg = cell_config(tmp_path, "iv", ports, mosquitto.port, telemetry={"interval_s": 3.0})
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "iv", client_id="iv-sub")
    sub.keep_messages = True

    def telemetry() -> list[dict[str, object]]:
        return [m for m in sub.messages if m["kind"] == "telemetry"]

    async def go() -> None:
        async with serving(cell, app, sub, stop_sub=False):
            await wait_for(lambda: len(telemetry()) >= 6, 60, "three intervals of 2 machines")
        await wait_for(lambda: len(telemetry()) == app.telemetry.messages, 10, "every message")
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
