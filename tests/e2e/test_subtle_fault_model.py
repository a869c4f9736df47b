"""A subtle fault that a threshold misses raises a model alert: simulated cell (Modbus TCP with
the vibration FIFO) → appliance serving the shipped `cnc_condition` bundle next to
`cnc_anomaly` (two `[[models]]`), or a bundle `appliance model fit` made from a recording →
Mosquitto → subscriber; the scores ride in the telemetry."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from cellhelp import cell_config, serving

from appliance.cli import main
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.infer.bundle import load_bundle
from appliance.modelkit.evaluate import score_windows
from appliance.modelkit.record import Recorder
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import FaultSchedule, SimulatedCell
from appliance.simulate.dataset import simulate_frames

pytestmark = pytest.mark.slow

#: Seed whose machine 1 starts with a 10 500 rpm operation after 0.5 s idle, so the imbalance
#: (which grows with speed²) shows within seconds.
SEED = 27


def _serve_imbalance(
    tmp_path: Path, mosquitto: MosquittoProcess, models: list[dict[str, str]], rule_model: str
) -> tuple[DemoSubscriber, dict[str, Any]]:
    """Serve ``models`` on machine 1 of cell SEED with an imbalance from the start until the
    score rule on ``rule_model`` raises (45 s at most)."""
    port = free_port()
    cell = SimulatedCell(
        machines=1,
        ports=[port],
        seed=SEED,
        faults=[FaultSchedule(machine=0, kind="imbalance", at_s=0.0, duration_s=600.0)],
    )
    cfg = cell_config(
        tmp_path,
        "subtle",
        [port],
        mosquitto.port,
        device={"timeout_s": 0.5, "waveform": {}},
        models=models,
        alerts={
            "rules": [
                # normal running stays below about 3 mm/s (docs/simulator.md)
                {"name": "vibration_high", "channel": "vibration_rms", "above": 3.0},
                {"name": rule_model, "source": "score", "model": rule_model, "above": 1.0},
            ]
        },
    )
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "subtle", client_id="subtle-sub")
    sub.keep_messages = True

    async def go() -> dict[str, Any]:
        async with serving(cell, app, sub):
            deadline = time.monotonic() + 45.0
            while not any(m["kind"] == "alert" and m["rule"] == rule_model for m in sub.messages):
                assert time.monotonic() < deadline, "no model alert within 45 s"
                await asyncio.sleep(0.1)
        return app.stats()

    return sub, asyncio.run(go())


def test_imbalance_raises_the_model_alert_while_the_vibration_threshold_stays_quiet(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    models = [
        {"name": "anomaly", "model": "cnc_anomaly"},
        {"name": "condition", "model": "cnc_condition"},
    ]
    sub, stats = _serve_imbalance(tmp_path, mosquitto, models, "condition")
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert {a["rule"] for a in alerts} == {"condition"}  # the threshold never fired
    assert alerts[0]["machine"] == "cnc-1" and alerts[0]["source"] == "score"
    telemetry = [m for m in sub.messages if m["kind"] == "telemetry"]
    scored = [m for m in telemetry if "condition" in m.get("scores", {})]
    assert scored and max(m["scores"]["condition"] for m in scored) > 1.0
    assert any("anomaly" in m.get("scores", {}) for m in telemetry)
    for m in sub.messages:
        jsonschema.validate(m, load_schema(m["kind"]))
    assert stats["models"]["condition"]["feature_rows"] > 0
    assert stats["models"]["condition"]["unscored_windows"] > 0  # idle before the first cut


def test_a_model_fitted_on_a_recording_is_served_and_finds_the_imbalance(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    # 15 min of healthy machining of the same machine, as `appliance record` writes it
    rec = Recorder(tmp_path / "rec")
    for frame in simulate_frames(SEED, 0, 900.0, device="cnc-1"):
        rec.on_frame(frame)
    rec.close()
    bundle = tmp_path / "fitted"
    channels = ["spindle_speed", "spindle_load", "vibration_rms", "vibration_wave"]
    assert main(["model", "fit", "--normal", str(tmp_path / "rec" / "cnc-1.csv"),
                 "--out", str(bundle), "--channels", *channels]) == 0  # fmt: skip
    b = load_bundle(str(bundle))
    np.testing.assert_allclose(
        score_windows(b, b.golden_inputs), b.golden_outputs, rtol=b.golden_rtol, atol=b.golden_atol
    )
    sub, stats = _serve_imbalance(
        tmp_path, mosquitto, [{"name": "fitted", "model": str(bundle)}], "fitted"
    )
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert {a["rule"] for a in alerts} == {"fitted"}  # the vibration threshold never fired
    assert stats["models"]["fitted"]["engine"]["rows"] > 0
