"""The CNN fault classifier over vibration spectrograms is served end to end: a simulated cell
(Modbus TCP with the vibration FIFO, real time) → appliance serving the shipped
`cnc_spectrogram` bundle → Mosquitto → subscriber. A bearing defect on one machine raises the
model's score above 1.0 and its alert; the healthy machine next to it stays below 1.0."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cellhelp import cell_config, serving

from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import FaultSchedule, SimulatedCell

pytestmark = pytest.mark.slow

#: Seed whose two machines both turn the spindle steadily from about 4 s after the start
#: (10 500 and 9 700 rpm), for about 7 of every 10 s.
SEED = 27


def test_a_bearing_defect_raises_the_spectrogram_models_alert_and_a_healthy_machine_stays_quiet(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(
        machines=2,
        ports=ports,
        seed=SEED,
        faults=[FaultSchedule(machine=1, kind="bearing_defect", at_s=0.0, duration_s=600.0)],
    )
    cfg = cell_config(
        tmp_path,
        "cnn",
        ports,
        mosquitto.port,
        device={"timeout_s": 0.5, "waveform": {}},
        models=[{"name": "spectrogram", "model": "cnc_spectrogram"}],
        alerts={
            "rules": [
                {"name": "vibration_high", "channel": "vibration_rms", "above": 3.0},
                {"name": "fault", "source": "score", "model": "spectrogram", "above": 1.0},
            ]
        },
    )
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "cnn", client_id="cnn-sub")
    sub.keep_messages = True

    def healthy_scores() -> list[float]:
        return [
            float(m["scores"]["spectrogram"])
            for m in sub.messages
            if m["kind"] == "telemetry"
            and m["machine"] == "cnc-1"
            and "spectrogram" in m.get("scores", {})
        ]

    async def go() -> dict[str, Any]:
        async with serving(cell, app, sub):
            deadline = time.monotonic() + 60.0
            while not (
                any(m["kind"] == "alert" and m["rule"] == "fault" for m in sub.messages)
                and len(healthy_scores()) >= 5
            ):
                assert time.monotonic() < deadline, "no model alert and healthy scores in 60 s"
                await asyncio.sleep(0.1)
        return app.stats()

    stats = asyncio.run(go())
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert {(a["rule"], a["machine"]) for a in alerts} == {("fault", "cnc-2")}
    faulty = [
        float(m["scores"]["spectrogram"])
        for m in sub.messages
        if m["kind"] == "telemetry"
        and m["machine"] == "cnc-2"
        and "spectrogram" in m.get("scores", {})
    ]
    assert max(faulty) > 1.0
    assert max(healthy_scores()) < 1.0
    for m in sub.messages:
        jsonschema.validate(m, load_schema(m["kind"]))
    model = stats["models"]["spectrogram"]
    assert model["feature_rows"] > 0 and model["engine"]["rows"] > 0
