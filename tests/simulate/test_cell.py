"""The simulated cell, read and driven by a real pymodbus client over localhost TCP.

Cells run fast-forwarded (``time_scale``) so that faults lasting simulated seconds play out in a
fraction of a wall second; each test stays within a few wall seconds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import free_port
from pymodbus.client import AsyncModbusTcpClient

from appliance.simulate.cell import (
    FAULT_REQUEST_REGISTER,
    FaultSchedule,
    SimulatedCell,
)
from drivers.modbus.codec import decode
from drivers.modbus.registers import Register, load_profile

PROFILE = load_profile("cnc-sim")


def ports(n: int) -> list[int]:
    found: set[int] = set()
    while len(found) < n:
        found.add(free_port())
    return sorted(found)


async def read_values(
    client: AsyncModbusTcpClient, profile: tuple[Register, ...] = PROFILE
) -> dict[str, float]:
    """Read every register of ``profile`` and decode it to its engineering value."""
    out: dict[str, float] = {}
    for reg in profile:
        if reg.table == "input":
            resp = await client.read_input_registers(reg.address, count=reg.count, device_id=1)
        else:
            resp = await client.read_holding_registers(reg.address, count=reg.count, device_id=1)
        assert not resp.isError(), (reg.name, resp)
        raw = decode(resp.registers, reg.type, reg.order, bit=reg.bit)
        assert isinstance(raw, (int, float))
        out[reg.name] = float(raw) * reg.scale + reg.offset
    return out


async def connected(port: int) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    return client


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, interval_s: float = 0.05
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout_s`` wall seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


def port_is_free(port: int) -> bool:
    """True if a new server could listen on ``port`` (with SO_REUSEADDR, as asyncio's does:
    connections the simulator closed may linger in TIME_WAIT, which does not block a server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_client_reads_plausible_values_from_every_machine() -> None:
    async def scenario() -> None:
        cell = SimulatedCell(machines=3, ports=ports(3), tick_hz=50.0)
        assert cell.machine_names == ["cnc-1", "cnc-2", "cnc-3"]
        async with cell:
            for port in cell.ports:
                client = await connected(port)
                try:
                    first = await read_values(client)
                    await asyncio.sleep(0.2)
                    later = await read_values(client)
                finally:
                    client.close()
                for v in (first, later):
                    assert 0.0 <= v["spindle_speed"] <= 12000.0
                    assert 0.0 <= v["spindle_load"] <= 100.0
                    for axis in "xyz":
                        assert 0.0 <= v[f"axis_load_{axis}"] <= 40.0
                    assert 25.0 <= v["spindle_temp"] <= 60.0
                    assert 20.0 <= v["coolant_temp"] <= 28.0
                    assert 0.0 <= v["vibration_rms"] <= 3.5
                    assert v["part_counter"] >= 1.0
                    assert v["program_state"] in (0.0, 1.0, 2.0)
                assert later["spindle_temp"] != first["spindle_temp"]  # the model is ticking
                assert later["part_counter"] >= first["part_counter"]

    asyncio.run(scenario())


def test_registers_hold_the_model_values_encoded_with_the_profile() -> None:
    async def scenario() -> None:
        # 0.01 Hz: the first tick is 100 s away, so the registers hold the initial values.
        async with SimulatedCell(machines=2, ports=ports(2), tick_hz=0.01, seed=3) as cell:
            for port, model in zip(cell.ports, cell.models, strict=True):
                client = await connected(port)
                try:
                    got = await read_values(client)
                finally:
                    client.close()
                expected = model.values()
                for reg in PROFILE:
                    tolerance = reg.scale / 2 if reg.type != "float32" else 1e-4
                    assert got[reg.name] == pytest.approx(expected[reg.name], abs=tolerance)

    asyncio.run(scenario())


def test_a_custom_profile_is_served_with_its_byte_order_scale_and_offset(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "odd.toml"
    profile.write_text(
        """
[[registers]]
name = "spindle_temp"
table = "holding"
address = 10
type = "float32"
order = "CDAB"

[[registers]]
name = "coolant_temp"
table = "input"
address = 3
type = "int32"
order = "DCBA"
scale = 0.001
offset = -40.0

[[registers]]
name = "spindle_speed"
table = "input"
address = 5
type = "uint16"
order = "BADC"
scale = 2.0
""",
        encoding="utf-8",
    )
    regs = load_profile(str(profile))

    async def scenario() -> None:
        async with SimulatedCell(
            machines=1, ports=ports(1), tick_hz=0.01, profile=str(profile)
        ) as cell:
            client = await connected(cell.ports[0])
            try:
                got = await read_values(client, regs)
            finally:
                client.close()
            expected = cell.models[0].values()
            assert got["spindle_temp"] == pytest.approx(expected["spindle_temp"], abs=1e-4)
            assert got["coolant_temp"] == pytest.approx(expected["coolant_temp"], abs=0.001)
            assert got["spindle_speed"] == pytest.approx(expected["spindle_speed"], abs=1.0)

    asyncio.run(scenario())


def test_writing_the_fault_request_register_injects_a_temp_ramp_that_reads_back() -> None:
    async def scenario() -> None:
        cell = SimulatedCell(machines=2, ports=ports(2), tick_hz=50.0, time_scale=10.0)
        async with cell:
            client = await connected(cell.ports[1])
            try:
                # 1 = temp_ramp, for 4 simulated seconds (0.4 s of wall time at x10).
                resp = await client.write_registers(FAULT_REQUEST_REGISTER, [1, 4], device_id=1)
                assert not resp.isError()

                async def hot() -> bool:
                    return (await read_values(client))["spindle_temp"] > 75.0

                async def cooled() -> bool:
                    return (await read_values(client))["spindle_temp"] < 65.0

                await wait_until(hot)
                request = await client.read_holding_registers(
                    FAULT_REQUEST_REGISTER, count=2, device_id=1
                )
                assert request.registers == [0, 4]  # the request was taken and cleared
                assert cell.models[0].values()["spindle_temp"] < 60.0  # only cnc-2 is faulty
                await wait_until(cooled)
                assert cell.models[1].active_faults == frozenset()
            finally:
                client.close()

    asyncio.run(scenario())


def test_a_fault_request_without_duration_uses_the_default_duration() -> None:
    async def scenario() -> None:
        async with SimulatedCell(machines=1, ports=ports(1), tick_hz=50.0) as cell:
            client = await connected(cell.ports[0])
            try:
                await client.write_register(FAULT_REQUEST_REGISTER, 2, device_id=1)

                async def surging() -> bool:
                    return (await read_values(client))["vibration_rms"] > 7.0

                await wait_until(surging)
                assert cell.models[0].active_faults == {"vibration_surge"}
            finally:
                client.close()
            await asyncio.sleep(1.0)  # a default (20 s) fault is still on after a second
            assert cell.models[0].active_faults == {"vibration_surge"}

    asyncio.run(scenario())


def test_a_scheduled_fault_fires_on_its_machine_only() -> None:
    async def scenario() -> None:
        schedule = [FaultSchedule(machine=1, kind="vibration_surge", at_s=2.0, duration_s=60.0)]
        cell = SimulatedCell(
            machines=2, ports=ports(2), tick_hz=50.0, time_scale=10.0, faults=schedule
        )
        async with cell:
            assert cell.models[1].active_faults == frozenset()
            faulty, healthy = await connected(cell.ports[1]), await connected(cell.ports[0])
            try:

                async def surging() -> bool:
                    return (await read_values(faulty))["vibration_rms"] > 7.0

                await wait_until(surging)
                assert cell.sim_time_s >= 2.0
                assert (await read_values(healthy))["vibration_rms"] < 3.5
                assert cell.models[0].active_faults == frozenset()
            finally:
                faulty.close()
                healthy.close()

    asyncio.run(scenario())


def test_inject_starts_a_fault_and_rejects_an_unknown_machine() -> None:
    cell = SimulatedCell(machines=2, ports=ports(2))
    cell.inject(1, "temp_ramp", 5.0)
    assert cell.models[1].active_faults == {"temp_ramp"}
    with pytest.raises(ValueError, match="machine index 2"):
        cell.inject(2, "temp_ramp", 5.0)
    with pytest.raises(ValueError, match="unknown fault kind"):
        cell.inject(0, "meltdown", 5.0)


def test_stop_is_idempotent_and_frees_the_ports() -> None:
    async def scenario() -> list[int]:
        cell = SimulatedCell(machines=2, ports=ports(2), tick_hz=50.0)
        await cell.stop()  # before start: nothing to do
        await cell.start()
        assert cell.running
        assert not any(port_is_free(p) for p in cell.ports)
        client = await connected(cell.ports[0])
        await cell.stop()
        await cell.stop()
        assert not cell.running
        assert cell.tick_task is None
        client.close()
        return cell.ports

    for port in asyncio.run(scenario()):
        assert port_is_free(port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


def test_start_fails_cleanly_when_a_port_is_taken() -> None:
    first, taken = ports(2)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()

        async def scenario() -> None:
            cell = SimulatedCell(machines=2, ports=[first, taken])
            with pytest.raises(OSError, match=f"cnc-2: cannot listen on 127.0.0.1:{taken}"):
                await cell.start()
            assert not cell.running
            assert cell.tick_task is None

        asyncio.run(scenario())
    assert port_is_free(first)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"machines": 0}, "machines must be >= 1"),
        ({"machines": 2, "ports": [5020]}, "1 ports given for 2 machines"),
        ({"machines": 2, "ports": [5020, 5020]}, "distinct"),
        ({"base_port": 65535, "machines": 2}, "does not fit"),
        ({"tick_hz": 0.0}, "tick_hz"),
        ({"time_scale": -1.0}, "time_scale"),
        (
            {"machines": 2, "faults": [FaultSchedule(2, "temp_ramp", 1.0, 1.0)]},
            "machine index 2",
        ),
    ],
)
def test_construction_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulatedCell(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, "temp_ramp", 1.0, 1.0), "machine must be >= 0"),
        ((0, "meltdown", 1.0, 1.0), "unknown fault kind"),
        ((0, "temp_ramp", -1.0, 1.0), "at_s"),
        ((0, "temp_ramp", 1.0, 0.0), "duration_s"),
    ],
)
def test_fault_schedule_rejects_bad_entries(
    args: tuple[int, str, float, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FaultSchedule(*args)
