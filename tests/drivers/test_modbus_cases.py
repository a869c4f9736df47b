"""Data-driven protocol cases (like Telegraf's ``testcases/``): each folder under ``cases/``
holds ``config.toml`` (a ``[device]`` register map as in the appliance config, and the
``[server]`` contents as hand-written hex words / bits) and ``expected.json`` (the decoded
values, string registers, and how many read requests the map needs). One parametrized test
serves the words from a real pymodbus TCP server and reads them through ModbusTcpDevice.

Server keys: ``holding``/``input`` (hex words from address 0), ``holding_at_<n>`` /
``input_at_<n>`` (hex words from address n), ``coils``/``discrete`` (bools from address 0).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.config import ModbusTcpConfig, parse_config
from drivers.modbus.tcp import ModbusTcpDevice
from drivers.quality import GOOD

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())


def server_device(contents: dict[str, Any]) -> SimDevice:
    tables: dict[str, list[SimData]] = {"coils": [], "discrete": [], "holding": [], "input": []}
    for key, values in contents.items():
        table, _, at = key.partition("_at_")
        start = int(at) if at else 0
        if table in ("coils", "discrete"):
            tables[table].append(SimData(start, values=list(values), datatype=DataType.BITS))
        else:
            words = [int(w, 16) for w in values]
            tables[table].append(SimData(start, values=words, datatype=DataType.REGISTERS))
    empty = [SimData(0, values=[False], datatype=DataType.BITS)]
    return SimDevice(
        id=1,
        simdata=(
            tables["coils"] or empty,
            tables["discrete"] or empty,
            tables["holding"] or [SimData(0, values=[0], datatype=DataType.REGISTERS)],
            tables["input"] or [SimData(0, values=[0], datatype=DataType.REGISTERS)],
        ),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_protocol_case_decodes_server_contents_as_expected(case: Path) -> None:
    spec = tomllib.loads((case / "config.toml").read_text(encoding="utf-8"))
    want = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    port = free_port()
    cfg = parse_config(
        {"devices": [{"name": case.name, "port": port, **spec["device"]}]},
        source=str(case / "config.toml"),
        base_dir=case,
    )
    (dev,) = cfg.devices
    assert isinstance(dev, ModbusTcpConfig)

    async def main() -> tuple[ModbusTcpDevice, Any]:
        server = ModbusTcpServer(server_device(spec["server"]), address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        device = ModbusTcpDevice(
            "127.0.0.1", port, dev.unit_id, dev.registers, 1.0, max_gap=dev.max_gap
        )
        try:
            await device.connect()
            return device, await device.read()
        finally:
            await device.close()
            await server.shutdown()

    device, result = asyncio.run(main())
    assert len(device.requests) == want["requests"]
    got = dict(zip(device.channels, result.values.tolist(), strict=True))
    assert set(got) == set(want["values"])
    for name, value in want["values"].items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
        assert not math.isnan(got[name])
    assert result.quality.tolist() == [GOOD] * len(device.channels)
    assert device.strings == want.get("strings", {})
