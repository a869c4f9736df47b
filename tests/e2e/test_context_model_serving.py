"""A model fitted with `--context program_state` (the machining phase register of the simulated
machines) is checked against the config, served by `Appliance` on the simulator through
Mosquitto, and its scores reach the telemetry: serving computes the features the fit computed,
the context among them, and the graph picks the phase's model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import jsonschema
import pytest
from cellhelp import cell_doc, serving, wait_for

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
    # the model relative to the config folder
    data = cell_doc("ctx", [port], mosquitto.port, models=[{"name": "phase", "model": "./phase"}])
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
        async with serving(cell, app, sub):
            await wait_for(lambda: len(scored()) >= 5, 60, "five scored windows")

    asyncio.run(go())
    assert app.models[0].engine.stats()["backend"] == "onnxruntime-cpu"  # golden check passed
    for m in scored():
        jsonschema.validate(m, load_schema("telemetry"))
        assert set(m["scores"]) == {"phase"}  # type: ignore[arg-type]
