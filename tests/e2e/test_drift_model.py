"""The self-baseline model is served end to end: a simulated cell (Modbus TCP, real time) →
appliance serving `cnc_drift` (its per-machine stage between the feature builders and the
batcher) → Mosquitto → subscriber. A coolant loss on one machine raises the model's alert long
before the coolant temperature reaches a threshold rule's limit; the healthy machine next to it
stays quiet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from modelhelp import quick_drift_bundle

from appliance.config import parse_config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import FaultSchedule, SimulatedCell

pytestmark = pytest.mark.slow

#: Seed whose two machines both cut steadily within seconds of the start.
SEED = 28
#: A plant's coolant limit: the healthy machines stay well below it (set points 21.5–23.5 °C,
#: up to 3 °C more at full speed and load), and so does the coolant loss during the test.
COOLANT_LIMIT_C = 30.0


def test_a_coolant_loss_raises_the_drift_models_alert_before_any_threshold_and_not_on_a_twin(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    bundle = quick_drift_bundle(tmp_path, learn_windows=3)
    ports = [free_port(), free_port()]
    cell = SimulatedCell(
        machines=2,
        ports=ports,
        seed=SEED,
        faults=[FaultSchedule(machine=1, kind="coolant_loss", at_s=8.0, duration_s=30.0)],
    )
    devices = [
        {
            "name": f"cnc-{i + 1}",
            "port": port,
            "profile": "cnc-sim",
            "poll_interval_ms": 100,
            "timeout_s": 0.5,
        }
        for i, port in enumerate(ports)
    ]
    cfg = parse_config(
        {
            "appliance": {"id": "drift"},
            "devices": devices,
            "models": [{"name": "drift", "model": str(bundle)}],
            "alerts": {
                "rules": [
                    {"name": "coolant_high", "channel": "coolant_temp", "above": COOLANT_LIMIT_C},
                    {"name": "fault", "source": "score", "model": "drift", "above": 1.0},
                ]
            },
            "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
            "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        },
        source="drift",
        base_dir=tmp_path,
    )
    app = Appliance(cfg)
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "drift", client_id="drift-sub")
    sub.keep_messages = True

    def scores(machine: str) -> list[float]:
        return [
            float(m["scores"]["drift"])
            for m in sub.messages
            if m["kind"] == "telemetry"
            and m["machine"] == machine
            and "drift" in m.get("scores", {})
        ]

    async def go() -> dict[str, Any]:
        await cell.start()
        sub.start()
        await app.start()
        try:
            deadline = time.monotonic() + 28.0
            while not (
                any(m["kind"] == "alert" and m["rule"] == "fault" for m in sub.messages)
                and len(scores("cnc-1")) >= 5
            ):
                assert time.monotonic() < deadline, "no model alert and healthy scores in 28 s"
                await asyncio.sleep(0.1)
        finally:
            await app.stop()
            await cell.stop()
            sub.stop()
        return app.stats()

    stats = asyncio.run(go())
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert {(a["rule"], a["machine"]) for a in alerts} == {("fault", "cnc-2")}
    assert max(scores("cnc-2")) > 1.0
    assert max(scores("cnc-1")) < 1.0
    coolant = [
        float(m["channels"]["coolant_temp"]["mean"])
        for m in sub.messages
        if m["kind"] == "telemetry" and "coolant_temp" in m.get("channels", {})
    ]
    assert coolant and max(coolant) < COOLANT_LIMIT_C - 2.0  # far from the threshold's limit
    for m in sub.messages:
        jsonschema.validate(m, load_schema(m["kind"]))
    model = stats["models"]["drift"]
    assert model["learning_windows"] >= 6  # each machine learned before it was scored
    assert {m: k["learned"] >= 1 for m, k in model["baseline_keys"].items()} == {
        "cnc-1": True,
        "cnc-2": True,
    }
    assert model["engine"]["rows"] > 0
