"""A device serving NaN and ±Inf float32 patterns (issue 10): those values are BAD at the driver,
never samples; the window's ``n`` counts only the finite samples and its statistics stay finite.
A real pymodbus server, the real appliance (acquisition → windows → telemetry → outbox)."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
from conftest import free_port
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.config import parse_config
from appliance.runtime import Appliance

CHANNELS = {"ok": 45.0, "not_a_number": math.nan, "plus_inf": math.inf, "minus_inf": -math.inf}


def test_nan_and_inf_from_a_device_are_missing_values_not_samples(tmp_path: Path) -> None:
    port = free_port()
    device = SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=list(CHANNELS.values()), datatype=DataType.FLOAT32)],
            [SimData(0, values=[0], datatype=DataType.REGISTERS)],
        ),
    )
    data = {
        "devices": [
            {
                "name": "m",
                "port": port,
                "poll_interval_ms": 50,
                "registers": [
                    {"name": name, "address": 2 * i, "type": "float32"}
                    for i, name in enumerate(CHANNELS)
                ],
            }
        ],
        "alerts": {"rules": [{"name": "hot", "channel": "plus_inf", "above": 100.0}]},
        "outbox": {"path": "o.sqlite"},
        "mqtt": {"port": free_port()},  # no broker: messages stay in the outbox
        "appliance": {"drain_timeout_s": 0.1},
    }
    app = Appliance(parse_config(data, source="t", base_dir=tmp_path))

    async def main() -> None:
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        try:
            await app.run_until_signal(duration_s=2.6)
        finally:
            await server.shutdown()

    asyncio.run(main())
    db = sqlite3.connect(tmp_path / "o.sqlite")
    payloads = [p for (p,) in db.execute("SELECT payload FROM records ORDER BY id")]
    db.close()
    msgs: list[dict[str, Any]] = [msgspec.json.decode(p) for p in payloads]
    assert not [m for m in msgs if m["kind"] == "alert"]  # +Inf is not above 100: it is missing
    windows = [m for m in msgs if m["kind"] == "telemetry"]
    assert windows
    for m in windows:
        ch = m["channels"]
        assert ch["ok"]["n"] > 0 and ch["ok"]["mean"] == 45.0
        for name in ("not_a_number", "plus_inf", "minus_inf"):
            assert ch[name]["n"] == 0 and ch[name]["mean"] is None, (name, ch[name])
