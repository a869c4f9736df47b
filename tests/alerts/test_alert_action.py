"""A rule's local action (off by default): on raise it writes an allowlisted register of the
machine (a real pymodbus server), on clear the release value; the write and its result are
recorded in the alert. Bad action config fails at load naming the key path."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.errors import ConfigError
from appliance.outbox import SqliteOutbox
from appliance.payload import decode_payload
from appliance.runtime import Appliance
from appliance.schemas import load_schema

REGISTERS = [
    {"name": "temp", "table": "holding", "address": 0, "type": "uint16", "scale": 0.1},
    {"name": "feed_hold", "table": "holding", "address": 1, "type": "uint16"},
    {"name": "spindle_speed", "table": "holding", "address": 2, "type": "uint16"},
]


def config(tmp_path: Path, port: int, **alerts: Any) -> dict[str, Any]:
    rule = {
        "name": "hot",
        "channel": "temp",
        "above": 80.0,
        "clear_below": 70.0,
        "action": {"register": "feed_hold", "value": 1, "on_clear": 0},
    }
    return {
        "appliance": {"id": "act"},
        "devices": [
            {"name": "cnc-1", "port": port, "poll_interval_ms": 50, "registers": REGISTERS}
        ],
        "alerts": {"rules": [rule], "writable": ["feed_hold"], **alerts},
        "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
        "mqtt": {"port": free_port()},
    }


def test_a_raised_alert_writes_the_feed_hold_and_its_clear_releases_it(tmp_path: Path) -> None:
    port = free_port()
    device = SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[250, 0, 0], datatype=DataType.REGISTERS)],
            [SimData(0, values=[0], datatype=DataType.REGISTERS)],
        ),
    )
    app = Appliance(parse_config(config(tmp_path, port), source="t", base_dir=tmp_path))
    feed_hold: list[int] = []

    async def main() -> None:
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            await app.start()

            async def hold() -> int:
                rr = await client.read_holding_registers(1, count=1, device_id=1)
                return int(rr.registers[0])

            await client.write_register(0, 900, device_id=1)  # 90.0 °C: hot
            deadline = time.monotonic() + 10
            while await hold() != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            feed_hold.append(await hold())
            await client.write_register(0, 600, device_id=1)  # 60.0 °C: cleared
            while await hold() != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            feed_hold.append(await hold())
            await asyncio.sleep(0.2)
        finally:
            await app.stop(drain_timeout_s=0.2)
            client.close()
            await server.shutdown()

    asyncio.run(main())
    assert feed_hold == [1, 0]
    outbox = SqliteOutbox(str(tmp_path / "outbox.sqlite"), appliance_id="act")
    outbox.open()
    alerts = [m for r in outbox.take(1000) if (m := decode_payload(r.payload))["kind"] == "alert"]
    outbox.close()
    assert [(a["state"], a["transition"]) for a in alerts] == [
        ("raised", 1),
        ("action", 2),
        ("cleared", 3),
        ("action", 4),
    ]
    assert len({a["alert_id"] for a in alerts}) == 1
    raise_act, clear_act = alerts[1]["action"], alerts[3]["action"]
    assert raise_act["ok"] and raise_act["on"] == "raise" and raise_act["raw"] == 1
    assert raise_act["register"] == "feed_hold" and raise_act["address"] == 1
    assert clear_act["ok"] and clear_act["on"] == "clear" and clear_act["raw"] == 0
    for a in alerts:
        jsonschema.validate(a, load_schema("alert"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"writable": []},
            "alerts.rules[0] (hot).action.register: 'feed_hold' is not in alerts.writable",
        ),
        (
            {
                "rules": [
                    {
                        "name": "hot",
                        "channel": "temp",
                        "above": 80.0,
                        "action": {"register": "temp", "value": 1.25},
                    }
                ],
                "writable": ["temp"],
            },
            "alerts.rules[0] (hot).action.value: cnc-1.temp: 1.25 is not a whole number",
        ),
        (
            {
                "rules": [
                    {
                        "name": "hot",
                        "channel": "temp",
                        "above": 80.0,
                        "action": {"register": "nope", "value": 1},
                    }
                ],
                "writable": ["nope"],
            },
            "alerts.rules[0] (hot).action.register: device cnc-1 has no register 'nope'",
        ),
    ],
)
def test_a_bad_action_fails_at_load_naming_the_key_path(
    change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    data = config(tmp_path, 502)
    data["alerts"].update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="t", base_dir=tmp_path)
    assert message in str(err.value), str(err.value)
