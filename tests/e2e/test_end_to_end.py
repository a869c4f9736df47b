"""The whole path with real peers: simulated cell (pymodbus servers) → appliance → Mosquitto →
a paho subscriber. Also the outage contract: the broker stopped for 10 s loses no window."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cellhelp import OVERTEMP, cell_config, overtemp_cell, serving, wait_for

from appliance.config import Config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


def make_config(tmp_path: Path, ports: list[int], mqtt_port: int) -> Config:
    return cell_config(
        tmp_path, "e2e", ports, mqtt_port, device={"timeout_s": 0.5}, alerts={"rules": [OVERTEMP]}
    )


def test_fault_on_a_simulated_machine_reaches_the_subscriber_as_alert_raise_and_clear(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports, cell = overtemp_cell()
    app = Appliance(make_config(tmp_path, ports, mosquitto.port))
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "e2e", client_id="e2e-sub")
    sub.keep_messages = True

    async def go() -> dict[str, Any]:
        async with serving(cell, app, sub):
            await wait_for(lambda: sub.alerts_cleared >= 1, 60, "alert raised and cleared")
        return app.stats()

    stats = asyncio.run(go())
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert [(a["machine"], a["rule"], a["state"]) for a in alerts[:2]] == [
        ("cnc-2", "spindle_overtemp", "raised"),
        ("cnc-2", "spindle_overtemp", "cleared"),
    ]
    assert alerts[0]["alert_id"] == alerts[1]["alert_id"]
    telemetry = [m for m in sub.messages if m["kind"] == "telemetry"]
    assert {m["machine"] for m in telemetry} == {"cnc-1", "cnc-2"}
    t = telemetry[-1]["channels"]
    assert 10.0 < t["coolant_temp"]["mean"] < 40.0 and t["spindle_temp"]["n"] > 0
    for m in sub.messages:  # what the appliance really sends matches the published contract
        jsonschema.validate(m, load_schema(m["kind"]))
    summary = sub.summary()
    assert summary["gaps"] == 0 and summary["status"] == "offline"
    assert stats["engine"]["rows"] > 0 and stats["outbox"]["pending"] == 0


def test_broker_down_for_10_s_loses_no_telemetry_window(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=3)
    app = Appliance(make_config(tmp_path, ports, mosquitto.port))
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "e2e", client_id="e2e-outage")

    def seqs() -> dict[str, int]:
        with sub.lock:
            return {k: v.last_seq for k, v in sub.streams.items() if k.startswith("telemetry/")}

    async def go() -> tuple[dict[str, int], dict[str, Any]]:
        async with serving(cell, app, sub, stop_sub=False):
            await wait_for(
                lambda: len(seqs()) == 2 and min(seqs().values()) >= 2,
                20,
                "telemetry before the outage",
            )
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(10.0)
            during = app.outbox.stats()["pending"]
            await asyncio.to_thread(mosquitto.start)
            await wait_for(lambda: app.outbox.stats()["pending"] == 0, 30, "outbox drained")
            await wait_for(
                lambda: all(v >= 15 for v in seqs().values()),
                20,
                "backlog delivered to the subscriber",
            )
        await asyncio.sleep(0.5)
        sub.stop()
        return seqs(), {"pending_during_outage": during}

    last, info = asyncio.run(go())
    assert info["pending_during_outage"] >= 10  # the windows of the outage waited on disk
    summary = sub.summary()
    for stream, st in summary["streams"].items():
        if stream.startswith("telemetry/"):
            assert st["gaps"] == [], f"{stream} has gaps {st['gaps']}"
            assert st["received"] == st["last_seq"], f"{stream}: not every window 1..N arrived"
    assert min(last.values()) >= 15
