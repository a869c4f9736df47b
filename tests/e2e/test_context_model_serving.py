"""A model fitted with `--context program_state` (the machining phase register of the simulated
machines) is checked against the config, served by `Appliance` on the simulator through
Mosquitto, and its scores reach the telemetry: serving computes the features the fit computed,
the context among them, and the graph picks the phase's model."""

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
from appliance.errors import ConfigError
from appliance.modelkit.fit import fit_model
from appliance.modelkit.record import Recorder
from appliance.runtime import Appliance
from appliance.runtime.checks import served_models
from appliance.schemas import load_schema
from appliance.simulate.cell import SimulatedCell
from appliance.simulate.dataset import simulate_frames

pytestmark = pytest.mark.slow
CHANNELS = ["spindle_speed", "spindle_load", "spindle_temp", "coolant_temp", "vibration_rms"]


async def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_context_model_is_served_on_the_simulator_and_its_scores_reach_telemetry(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    rec = Recorder(tmp_path / "rec")
    for frame in simulate_frames(4, 0, 900.0, waveform=False, device="cnc-1"):
        rec.on_frame(frame)
    rec.close()
    res = fit_model(
        [tmp_path / "rec" / "cnc-1.csv"],
        tmp_path / "conf" / "phase",
        channels=CHANNELS,
        context="program_state",
        name="phase",
    )
    assert res.context_values  # at least the cutting phase has its own model
    port = free_port()
    data = {
        "appliance": {"id": "ctx"},
        "devices": [{"name": "cnc-1", "port": port, "profile": "cnc-sim", "poll_interval_ms": 100}],
        "models": [{"name": "phase", "model": "./phase"}],  # relative to the config folder
        "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
        "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    }
    cfg = parse_config(data, source="ctx", base_dir=tmp_path / "conf")
    # a device without the context channel is refused, naming it
    lacking = tmp_path / "lacking.toml"
    lacking.write_text('[[registers]]\nname = "spindle_speed"\naddress = 0\n')
    bad = parse_config(
        {**data, "devices": [{"name": "cnc-1", "port": port, "profile": str(lacking)}]},
        base_dir=tmp_path / "conf",
    )
    with pytest.raises(ConfigError, match=r"models\[0\] \(phase\)\.model: .*program_state"):
        served_models(bad)

    cell = SimulatedCell(machines=1, ports=[port], seed=4, time_scale=5.0)
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "ctx", client_id="ctx-sub")
    sub.keep_messages = True

    def scored() -> list[dict[str, object]]:
        return [m for m in sub.messages if m["kind"] == "telemetry" and "scores" in m]

    async def go() -> None:
        await cell.start()
        sub.start()
        await app.start()
        try:
            await _wait_for(lambda: len(scored()) >= 5, 60, "five scored windows")
        finally:
            await app.stop()
            await cell.stop()
            sub.stop()

    asyncio.run(go())
    assert app.models[0].engine.stats()["backend"] == "onnxruntime-cpu"  # golden check passed
    for m in scored():
        jsonschema.validate(m, load_schema("telemetry"))
        assert set(m["scores"]) == {"phase"}  # type: ignore[arg-type]
