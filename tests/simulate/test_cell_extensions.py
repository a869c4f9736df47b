"""Simulator extensions read by real clients: byte-order variants, transport faults, CSV replay.

Every test runs a real pymodbus server on a free localhost port and reads it with the
appliance's own driver (``ModbusTcpDevice``) or a bare pymodbus client.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from pymodbus.client import AsyncModbusTcpClient

from appliance.simulate.cell import FAULT_REQUEST_REGISTER, SimulatedCell, with_byte_order
from appliance.simulate.replay import load_replay, parse_map
from drivers.errors import DeviceUnavailable
from drivers.modbus.codec import BYTE_ORDERS
from drivers.modbus.registers import load_profile
from drivers.modbus.tcp import GOOD, ModbusTcpDevice

PROFILE = load_profile("cnc-sim")


def names(device: ModbusTcpDevice) -> list[str]:
    return [r.name for r in device.registers]


@pytest.mark.parametrize("order", BYTE_ORDERS)
def test_the_driver_decodes_every_byte_order_the_simulator_serves(order: str) -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], byte_order=order, fifo_address=None):
            right = ModbusTcpDevice("127.0.0.1", port, 1, with_byte_order(PROFILE, order))
            wrong = ModbusTcpDevice("127.0.0.1", port, 1, PROFILE)
            await right.connect()
            await wrong.connect()
            try:
                good = await right.read()
                naive = await wrong.read()
            finally:
                await right.close()
                await wrong.close()
            assert (good.quality == GOOD).all()
            temp = good.values[names(right).index("spindle_temp")]
            assert 15.0 < temp < 70.0
            naive_temp = naive.values[names(wrong).index("spindle_temp")]
            if order == "ABCD":
                assert naive_temp == pytest.approx(temp, abs=0.5)
            else:
                assert not 15.0 < naive_temp < 70.0, "the served layout did not change"

    asyncio.run(scenario())


@pytest.mark.parametrize("order", ["CDAB", "BADC", "DCBA"])
def test_shipped_byte_order_profiles_match_the_simulators_rewrite(order: str) -> None:
    shipped = load_profile(f"cnc-sim-{order.lower()}")
    assert shipped == with_byte_order(PROFILE, order)


def test_a_timeout_fault_silences_the_device_then_it_answers_again() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], fifo_address=None) as cell:
            dev = ModbusTcpDevice("127.0.0.1", port, 1, PROFILE, timeout_s=0.2)
            await dev.connect()
            try:
                await dev.read()
                cell.inject(0, "timeout", 0.5)
                t0 = time.monotonic()
                with pytest.raises(DeviceUnavailable, match="no answer"):
                    await dev.read()
                assert time.monotonic() - t0 >= 0.15
                await asyncio.sleep(max(0.0, t0 + 0.55 - time.monotonic()))
                await dev.connect()
                result = await dev.read()
                assert (result.quality == GOOD).all()
            finally:
                await dev.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("kind", "code"), [("exception", 4), ("busy", 6)])
def test_an_exception_fault_refuses_every_request_with_its_code(kind: str, code: int) -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=2, ports=[port, free_port()], fifo_address=None) as cell:
            dev = ModbusTcpDevice("127.0.0.1", port, 1, PROFILE)
            await dev.connect()
            try:
                cell.inject(0, kind, 0.3)
                refused = await dev.read()
                assert not (refused.quality == GOOD).any()
                assert {e.exception_code for e in refused.exceptions} == {code}
                await asyncio.sleep(0.35)
                again = await dev.read()
                assert (again.quality == GOOD).all()
            finally:
                await dev.close()

    asyncio.run(scenario())


def test_a_disconnect_fault_drops_open_connections_and_new_ones_until_it_ends() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], fifo_address=None) as cell:
            dev = ModbusTcpDevice("127.0.0.1", port, 1, PROFILE, timeout_s=1.0)
            await dev.connect()
            try:
                await dev.read()
                cell.inject(0, "disconnect", 0.4)
                t0 = time.monotonic()
                with pytest.raises(DeviceUnavailable):
                    await dev.read()
                assert time.monotonic() - t0 < 0.5, "the drop was not noticed at once"
                await dev.connect()
                with pytest.raises(DeviceUnavailable):
                    await dev.read()
                await asyncio.sleep(max(0.0, t0 + 0.45 - time.monotonic()))
                await dev.connect()
                assert (await dev.read()).quality.tolist() == [GOOD] * len(PROFILE)
            finally:
                await dev.close()

    asyncio.run(scenario())


def test_transport_faults_can_be_requested_over_modbus() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], fifo_address=None, tick_hz=50.0):
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
            assert await client.connect()
            try:
                # 4 = exception; duration 1 simulated s
                await client.write_registers(FAULT_REQUEST_REGISTER, [4, 1], device_id=1)
                loop = asyncio.get_running_loop()
                end = loop.time() + 2.0
                refused = False
                while loop.time() < end and not refused:
                    resp = await client.read_input_registers(0, count=1, device_id=1)
                    refused = resp.isError() and resp.exception_code == 4
                    await asyncio.sleep(0.02)
                assert refused
            finally:
                client.close()

    asyncio.run(scenario())


def test_transport_faults_need_a_running_cell_and_a_known_machine() -> None:
    cell = SimulatedCell(machines=1, ports=[free_port()])
    with pytest.raises(RuntimeError, match="running"):
        cell.inject(0, "timeout", 1.0)
    with pytest.raises(ValueError, match="machine index"):
        cell.inject(3, "timeout", 1.0)


CSV = """t,rpm,vib,ignored
0.0,1000,1.5,x
0.5,2000,2.5,x
1.0,3000,,x
"""


def test_replay_serves_recorded_values_at_their_times_and_loops(tmp_path: Path) -> None:
    path = tmp_path / "rec.csv"
    path.write_text(CSV)
    replay = load_replay(path, parse_map(["rpm=spindle_speed", "vib=vibration_rms"]))
    assert replay.period_s == pytest.approx(1.5)
    assert replay.values_at(0.6) == {"spindle_speed": 2000.0, "vibration_rms": 2.5}
    assert replay.values_at(1.2) == {"spindle_speed": 3000.0, "vibration_rms": 2.5}
    assert replay.values_at(1.5 + 0.1)["spindle_speed"] == 1000.0

    async def scenario() -> None:
        port = free_port()
        # 10x fast-forward: the 1.5 s recording loops every 0.15 wall s.
        async with SimulatedCell(
            machines=1, ports=[port], replay=replay, time_scale=10.0, tick_hz=100.0
        ):
            dev = ModbusTcpDevice("127.0.0.1", port, 1, PROFILE)
            await dev.connect()
            try:
                seen: set[float] = set()
                loop = asyncio.get_running_loop()
                end = loop.time() + 1.5
                while loop.time() < end and len(seen) < 3:
                    r = await dev.read()
                    seen.add(float(r.values[names(dev).index("spindle_speed")]))
                    vib = float(r.values[names(dev).index("vibration_rms")])
                    assert vib in (pytest.approx(1.5), pytest.approx(2.5))
                    await asyncio.sleep(0.01)
            finally:
                await dev.close()
            assert seen == {1000.0, 2000.0, 3000.0}

    asyncio.run(scenario())


def test_replay_accepts_iso_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text(
        "time,temp\n2026-03-01T08:00:00Z,30\n2026-03-01T08:00:02Z,31\n2026-03-01T08:00:04Z,32\n"
    )
    replay = load_replay(path, {"temp": "spindle_temp"})
    assert np.allclose(replay.t_s, [0.0, 2.0, 4.0])
    assert replay.values_at(3.0) == {"spindle_temp": 31.0}


@pytest.mark.parametrize(
    ("text", "mapping", "message"),
    [
        ("t,a\n0,1\n", {"a": "spindle_speed"}, "at least two rows"),
        ("t,a\n0,1\n0,2\n", {"a": "spindle_speed"}, ":3: time does not increase"),
        ("t,a\n0,1\n1,x\n", {"a": "spindle_speed"}, ":3: column 'a': 'x' is not a number"),
        ("t,a\n0,1\n1,2\n", {"b": "spindle_speed"}, "no column 'b'"),
        ("t,a\n0,1\n1,2\n", {"a": "nonsense"}, "not a register"),
    ],
)
def test_replay_rejects_unusable_files_naming_the_line(
    tmp_path: Path, text: str, mapping: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_replay(path, mapping)
