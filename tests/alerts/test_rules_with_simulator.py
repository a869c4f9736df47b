"""Rule kinds driven through raise and clear by the simulator's faults, in the real pipeline:
a simulated cell (pymodbus servers) → appliance (acquisition, alerts, outbox). No broker: the
alert messages are read back from the outbox file."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.outbox import SqliteOutbox
from appliance.payload import decode_payload
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import FaultSchedule, SimulatedCell

pytestmark = pytest.mark.slow

RULES = [
    {"name": "overtemp", "channel": "spindle_temp", "above": 75.0, "clear_below": 65.0},
    {
        "name": "vibration",
        "channel": "vibration_rms",
        "above": 7.5,
        "clear_below": 5.0,
        "debounce_k": 3,
        "debounce_n": 5,
        "min_active_s": 1.0,
    },
    {"name": "offline", "kind": "offline", "for_s": 1.5, "severity": "major"},
]


def test_each_fault_raises_its_rule_once_on_its_machine_and_clears_it(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(4)]
    cell = SimulatedCell(
        machines=4,
        ports=ports,
        seed=11,
        time_scale=3.0,
        faults=[
            FaultSchedule(machine=0, kind="temp_ramp", at_s=3.0, duration_s=12.0),
            FaultSchedule(machine=1, kind="vibration_surge", at_s=3.0, duration_s=9.0),
            FaultSchedule(machine=2, kind="timeout", at_s=3.0, duration_s=9.0),
        ],
    )
    cfg = parse_config(
        {
            "appliance": {"id": "sim"},
            "devices": [
                {
                    "name": f"cnc-{i + 1}",
                    "port": p,
                    "profile": "cnc-sim",
                    "poll_interval_ms": 100,
                    "timeout_s": 0.3,
                }
                for i, p in enumerate(ports)
            ],
            "alerts": {"rules": RULES},
            "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
            "mqtt": {"port": free_port()},  # nobody listens: messages stay in the outbox
        },
        source="sim",
        base_dir=tmp_path,
    )
    app = Appliance(cfg)

    async def go() -> None:
        await cell.start()
        await app.start()
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                if app.alerts.raised >= 3 and not app.alerts.active():
                    await asyncio.sleep(1.0)  # anything more would show now
                    break
                await asyncio.sleep(0.1)
        finally:
            await app.stop(drain_timeout_s=0.5)
            await cell.stop()

    asyncio.run(go())
    outbox = SqliteOutbox(str(tmp_path / "outbox.sqlite"), appliance_id="sim")
    outbox.open()
    msgs: list[dict[str, Any]] = [decode_payload(r.payload) for r in outbox.take(10_000)]
    outbox.close()
    alerts = [m for m in msgs if m["kind"] == "alert"]
    for m in alerts:
        jsonschema.validate(m, load_schema("alert"))
    got = sorted((a["machine"], a["rule"], a["state"]) for a in alerts)
    assert got == [
        ("cnc-1", "overtemp", "cleared"),
        ("cnc-1", "overtemp", "raised"),
        ("cnc-2", "vibration", "cleared"),
        ("cnc-2", "vibration", "raised"),
        ("cnc-3", "offline", "cleared"),
        ("cnc-3", "offline", "raised"),
    ], got
    for rule in ("overtemp", "vibration", "offline"):
        pair = [a for a in alerts if a["rule"] == rule]
        assert pair[0]["alert_id"] == pair[1]["alert_id"]
        assert pair[0]["evidence"]["from"] <= pair[0]["evidence"]["to"]
    offline = [a for a in alerts if a["rule"] == "offline"]
    assert offline[0]["value"] > 1.5 and offline[1]["reason"] == "condition_cleared"
