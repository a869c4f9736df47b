"""``device.write`` against a real pymodbus server polled by a running appliance: only what
``[[downlink.writes]]`` allows is written; everything else is refused, counted, and the
register is untouched; a device refusal is an ``error`` carrying the device's exception."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.config import Config, parse_config
from appliance.demo.mosquitto import free_port
from appliance.downlink import device_write
from appliance.downlink.base import Reply, Request
from appliance.errors import ConfigError
from appliance.runtime import Appliance

REGISTERS = [
    {"name": "temp", "table": "holding", "address": 0, "type": "uint16", "scale": 0.1},
    {"name": "feed_override", "table": "holding", "address": 1, "type": "uint16"},
    {"name": "spare", "table": "holding", "address": 2, "type": "uint16"},
    {"name": "lamp", "table": "coil", "address": 0, "type": "bool"},
]
WRITES = [
    {"device": "cnc-1", "register": "feed_override", "min": 0, "max": 120},
    {"device": "cnc-1", "register": "temp", "min": 0, "max": 50},
    {"device": "cnc-1", "register": "lamp", "min": 0, "max": 1},
    {"device": "cnc-1", "address": 40, "min": 0, "max": 100},  # not served: exception 2
    {"device": "cnc-1", "address": 3, "type": "int16", "min": -100, "max": 100},
]


@dataclass
class Ctx:
    """A :class:`~appliance.downlink.base.CommandContext` over one running appliance."""

    appliance: Appliance
    config: Config
    state_dir: Path
    config_path: Path | None = None


def config(tmp_path: Path, ports: list[int], writes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "appliance": {"id": "dw"},
        "devices": [
            {
                "name": f"cnc-{i + 1}",
                "port": port,
                "poll_interval_ms": 50,
                "timeout_s": 0.5,
                "registers": REGISTERS,
            }
            for i, port in enumerate(ports)
        ],
        "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
        "mqtt": {"port": free_port()},
        "downlink": {"writes": writes},
    }


def sim_device() -> SimDevice:
    return SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[250, 100, 7, 0], datatype=DataType.REGISTERS)],
            [SimData(0, values=[0], datatype=DataType.REGISTERS)],
        ),
    )


Scenario = Callable[
    [Callable[[dict[str, Any]], Awaitable[Reply]], AsyncModbusTcpClient], Awaitable[None]
]


def run_with_cell(tmp_path: Path, scenario: Scenario, machines: int = 1) -> None:
    """Serve ``machines`` pymodbus devices, run the appliance polling them, run ``scenario``
    with a ``write(body)`` that calls the handler and a client of machine 1's server."""
    ports = [free_port() for _ in range(machines)]
    cfg = parse_config(config(tmp_path, ports, WRITES), source="t", base_dir=tmp_path)
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path)
    n = iter(range(10**6))

    async def write(body: dict[str, Any]) -> Reply:
        req = Request("device.write", f"r{next(n)}", body, time.time())
        return await device_write.COMMANDS["device.write"](ctx, req)

    async def main() -> None:
        servers = [ModbusTcpServer(sim_device(), address=("127.0.0.1", p)) for p in ports]
        for server in servers:
            await server.serve_forever(background=True)
        client = AsyncModbusTcpClient("127.0.0.1", port=ports[0])
        await client.connect()
        try:
            await app.start()
            deadline = time.monotonic() + 10
            while not all(p.driver.connected for p in app.acquisition.pollers):  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the appliance did not connect"
                await asyncio.sleep(0.05)
            await scenario(write, client)
        finally:
            await app.stop(drain_timeout_s=0.2)
            client.close()
            for server in servers:
                await server.shutdown()

    asyncio.run(main())


async def holding(client: AsyncModbusTcpClient, address: int, count: int = 1) -> list[int]:
    rr = await client.read_holding_registers(address, count=count, device_id=1)
    return [int(v) for v in rr.registers]


def test_an_allowlisted_write_changes_the_register_and_replies_with_the_devices_answer(
    tmp_path: Path,
) -> None:
    replies: list[Reply] = []

    async def scenario(write: Any, client: AsyncModbusTcpClient) -> None:
        replies.append(await write({"device": "cnc-1", "register": "feed_override", "value": 80}))
        assert await holding(client, 1) == [80]
        replies.append(await write({"device": "cnc-1", "register": "temp", "value": 42.5}))
        assert await holding(client, 0) == [425]  # scale 0.1 undone
        replies.append(await write({"device": "cnc-1", "address": 3, "value": 95}))
        assert await holding(client, 3) == [95]
        replies.append(await write({"device": "cnc-1", "register": "lamp", "value": 1}))
        rr = await client.read_coils(0, count=1, device_id=1)
        assert rr.bits[0] is True
        replies.append(await write({"device": "cnc-1", "address": 3, "value": -5}))
        assert await holding(client, 3) == [0x10000 - 5]  # int16 -5 on the wire

    before = device_write.stats().get("ok", 0)
    run_with_cell(tmp_path, scenario)
    assert [r.code for r in replies] == ["ok"] * 5
    first = replies[0].body
    assert first["reply"] == {"function_code": 6, "address": 1, "value": 80}
    assert first["read_back"] == 80 and first["raw"] == 80 and first["register"] == "feed_override"
    assert replies[1].body["raw"] == 425 and replies[1].body["value"] == 42.5
    assert replies[3].body["reply"]["function_code"] == 5
    assert replies[3].body["read_back"] == 1
    assert replies[4].body["raw"] == -5 and replies[4].body["read_back"] == -5
    assert device_write.stats()["ok"] == before + 5


def test_writes_outside_the_allowlist_are_refused_counted_and_leave_the_registers_alone(
    tmp_path: Path,
) -> None:
    replies: dict[str, Reply] = {}

    async def scenario(write: Any, client: AsyncModbusTcpClient) -> None:
        cases = {
            "other_register": {"device": "cnc-1", "register": "spare", "value": 1},
            "other_address": {"device": "cnc-1", "address": 2, "value": 1},
            "out_of_range": {"device": "cnc-1", "register": "feed_override", "value": 121},
            "below_range": {"device": "cnc-1", "address": 3, "value": -101},
            "by_address_of_a_register_entry": {"device": "cnc-1", "address": 1, "value": 5},
            "other_device": {"device": "cnc-2", "register": "feed_override", "value": 50},
            "unknown_device": {"device": "press-9", "register": "feed_override", "value": 50},
            "not_whole": {"device": "cnc-1", "register": "temp", "value": 42.55},
            "bad_value": {"device": "cnc-1", "register": "feed_override", "value": "80"},
            "bool_value": {"device": "cnc-1", "register": "feed_override", "value": True},
            "both": {"device": "cnc-1", "register": "feed_override", "address": 1, "value": 5},
        }
        for name, body in cases.items():
            replies[name] = await write(body)
        assert await holding(client, 0, 4) == [250, 100, 7, 0]

    before = device_write.stats()
    run_with_cell(tmp_path, scenario, machines=2)
    assert {k: r.code for k, r in replies.items()} == dict.fromkeys(replies, "refused")
    reasons = {k: r.body["reason"] for k, r in replies.items()}
    assert reasons == {
        "other_register": "not_allowed",
        "other_address": "not_allowed",
        "out_of_range": "out_of_range",
        "below_range": "out_of_range",
        "by_address_of_a_register_entry": "not_allowed",
        "other_device": "not_allowed",
        "unknown_device": "unknown_device",
        "not_whole": "not_representable",
        "bad_value": "bad_request",
        "bool_value": "bad_request",
        "both": "bad_request",
    }
    assert "cnc-1 spare is not on the allowlist" in replies["other_register"].message
    assert "121 is outside the allowed range (0..120)" in replies["out_of_range"].message
    assert "cnc-2 feed_override is not on the allowlist" in replies["other_device"].message
    after = device_write.stats()
    assert after["refused"] - before.get("refused", 0) == len(replies)
    assert after["refused_out_of_range"] - before.get("refused_out_of_range", 0) == 2


def test_a_write_the_device_refuses_is_an_error_carrying_its_exception(tmp_path: Path) -> None:
    replies: list[Reply] = []

    async def scenario(write: Any, client: AsyncModbusTcpClient) -> None:
        replies.append(await write({"device": "cnc-1", "address": 40, "value": 3}))

    run_with_cell(tmp_path, scenario)
    (reply,) = replies
    assert reply.code == "error"
    assert reply.body["reply"]["function_code"] == 0x86
    assert reply.body["reply"]["exception_code"] == 2
    assert reply.body["reply"]["exception"] == "illegal data address"
    assert "refused the write" in reply.message


def test_a_device_that_is_not_connected_is_an_error_not_a_crash(tmp_path: Path) -> None:
    cfg = parse_config(config(tmp_path, [free_port()], WRITES), source="t", base_dir=tmp_path)
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path)
    body = {"device": "cnc-1", "register": "feed_override", "value": 10}

    async def main() -> tuple[Reply, Reply]:
        stopped = await device_write.device_write(ctx, Request("device.write", "a", body, 0.0))
        await app.start()
        try:
            running = await device_write.device_write(ctx, Request("device.write", "b", body, 0.0))
        finally:
            await app.stop(drain_timeout_s=0.2)
        return stopped, running

    stopped, running = asyncio.run(main())
    assert stopped.code == "refused" and stopped.body["reason"] == "not_running"
    assert running.code == "error" and "not connected" in running.message


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"device": "cnc-9", "register": "spare", "min": 0, "max": 1},
            "downlink.writes[0] (cnc-9): device 'cnc-9' is not a configured device",
        ),
        (
            {"device": "cnc-1", "register": "nope", "min": 0, "max": 1},
            "downlink.writes[0] (cnc-1): device cnc-1 has no register 'nope'",
        ),
        (
            {"device": "cnc-1", "register": "spare", "address": 2, "min": 0, "max": 1},
            "give `register` (a register name) or `address`, exactly one",
        ),
        (
            {"device": "cnc-1", "register": "spare", "min": 5, "max": 1},
            "min (5.0) must be <= max (1.0)",
        ),
        (
            {"device": "cnc-1", "address": 2, "min": 0, "max": 70000},
            "downlink.writes[0] (cnc-1).max: 70000.0 is not a raw uint16 value (0..65535)",
        ),
        (
            {"device": "cnc-1", "register": "spare", "table": "coil", "min": 0, "max": 1},
            "`table`/`type` go with `address`",
        ),
    ],
)
def test_a_bad_allowlist_entry_is_a_config_error_naming_it(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="downlink") as err:
        parse_config(config(tmp_path, [free_port()], [entry]), source="t", base_dir=tmp_path)
    assert message in str(err.value)


def test_an_input_register_cannot_be_allowlisted(tmp_path: Path) -> None:
    data = config(
        tmp_path, [free_port()], [{"device": "cnc-1", "register": "x", "min": 0, "max": 1}]
    )
    data["devices"][0]["registers"] = [*REGISTERS, {"name": "x", "table": "input", "address": 9}]
    with pytest.raises(ConfigError, match=r"cnc-1\.x is input uint16; a write goes to a coil"):
        parse_config(data, source="t", base_dir=tmp_path)
