"""The cell served over Modbus RTU on a real socat pty pair, read by pymodbus' serial client."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusIOException

from appliance.demo.mosquitto import free_port_block
from appliance.simulate.cell import FaultSchedule, SimulatedCell
from appliance.simulate.cli import add_arguments, run
from drivers.modbus.codec import decode

pytestmark = pytest.mark.pty


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals from socat: (the client's end, the server's end)."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: run `apt-get install -y socat` (.ci/run does)")
    client_end, server_end = str(tmp_path / "client"), str(tmp_path / "server")
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={client_end}", f"pty,raw,echo=0,link={server_end}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5.0
        while not (Path(client_end).exists() and Path(server_end).exists()):
            if time.monotonic() > deadline:
                pytest.fail("socat did not create the pty pair")
            time.sleep(0.01)
        yield client_end, server_end
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def rtu_client(port: str) -> AsyncModbusSerialClient:
    client = AsyncModbusSerialClient(
        port, framer=FramerType.RTU, baudrate=115200, timeout=0.3, retries=0, reconnect_delay=0
    )
    assert await client.connect()
    return client


def test_every_machine_answers_as_its_own_unit_on_the_rtu_line(
    pty_pair: tuple[str, str],
) -> None:
    client_end, server_end = pty_pair

    async def scenario() -> None:
        async with SimulatedCell(
            machines=2,
            ports=[free_port(), free_port()],
            serial_port=server_end,
            serial_baudrate=115200,
        ) as cell:
            client = await rtu_client(client_end)
            try:
                for unit in (1, 2):
                    resp = await client.read_input_registers(5, count=2, device_id=unit)
                    assert not resp.isError(), resp
                    temp = decode(resp.registers, "float32")
                    model_temp = cell.models[unit - 1].values()["spindle_temp"]
                    assert temp == pytest.approx(model_temp, abs=2.0)
            finally:
                client.close()

    asyncio.run(scenario())


def test_a_crc_garbage_fault_corrupts_only_that_units_answers(
    pty_pair: tuple[str, str],
) -> None:
    client_end, server_end = pty_pair

    async def scenario() -> None:
        async with SimulatedCell(
            machines=2,
            ports=[free_port(), free_port()],
            serial_port=server_end,
            serial_baudrate=115200,
            fifo_address=None,
        ) as cell:
            client = await rtu_client(client_end)
            try:
                cell.inject(0, "crc_garbage", 0.5)
                # pymodbus drops the frame with the bad CRC and runs into its timeout
                with pytest.raises(ModbusIOException, match="No response"):
                    await client.read_input_registers(0, count=1, device_id=1)
            finally:
                client.close()
            assert cell.transport_fault_hits[0] == 1, "the answer was not sent garbled"
            client = await rtu_client(client_end)
            try:
                good = await client.read_input_registers(0, count=1, device_id=2)
                assert not good.isError()
            finally:
                client.close()

    asyncio.run(scenario())


def test_crc_garbage_needs_the_rtu_server() -> None:
    async def scenario() -> None:
        async with SimulatedCell(machines=1, ports=[free_port()]) as cell:
            with pytest.raises(ValueError, match="serial_port"):
                cell.inject(0, "crc_garbage", 1.0)

    asyncio.run(scenario())


def test_a_scheduled_crc_garbage_fault_without_a_serial_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="RTU server"):
        SimulatedCell(machines=1, faults=[FaultSchedule(0, "crc_garbage", 1.0, 1.0)])


def test_the_serial_option_serves_the_cell_over_rtu_then_exits_zero(
    pty_pair: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--machines", "2", "--base-port", str(free_port_block(2)), "--duration", "0.2"]
        + ["--serial", pty_pair[1], "--serial-baud", "115200"]
    )
    caplog.set_level("INFO", logger="appliance.simulate")
    assert run(args) == 0
    assert f"Modbus RTU on {pty_pair[1]} at 115200 baud: units 1-2" in caplog.text
