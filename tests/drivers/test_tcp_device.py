"""ModbusTcpDevice against real Modbus TCP servers on localhost: pymodbus' own server (in the same
event loop) and modbus-tk's server (an independent implementation, in its own thread).

Server-side values are encoded by the servers' own code (pymodbus SimData types) or by
``struct`` (modbus-tk), never by our codec, so a symmetric codec bug cannot hide.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import modbus_tk.defines as cst
import numpy as np
import pytest
from conftest import free_port, wait_port
from modbus_tk import modbus_tcp
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.errors import DeviceException, DeviceUnavailable
from drivers.modbus.registers import Register
from drivers.modbus.tcp import (
    CLIENTS,
    HoldingRegistersResponse,
    InputRegistersResponse,
    ModbusTcpDevice,
    TcpClient,
)
from drivers.quality import BAD, GOOD


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> TcpClient:
    """Every test with a real peer runs with both Modbus TCP clients."""
    value: TcpClient = request.param
    return value


REGISTERS = (
    Register(name="temp", address=0, type="float32"),
    Register(name="load", address=2, type="int16", scale=0.1),
    Register(name="speed", address=3, type="uint16"),
    Register(name="parts", address=4, type="uint32", scale=2.0, offset=1.0),
    Register(name="pressure", address=0, type="uint16", table="input", scale=0.01),
    Register(name="door", address=1, type="bool", table="coil"),
    Register(name="estop", address=0, type="bool", table="discrete"),
)
EXPECTED = [38.25, -45.6, 1200.0, 140001.0, 12.34, 1.0, 0.0]


def pymodbus_device(unit_id: int = 1) -> SimDevice:
    """The values of ``EXPECTED``, laid out as ``REGISTERS`` says, with pymodbus' encoders."""
    return SimDevice(
        id=unit_id,
        simdata=(
            [SimData(0, values=[False, True, False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [
                SimData(0, values=[38.25], datatype=DataType.FLOAT32),
                SimData(2, values=[-456], datatype=DataType.INT16),
                SimData(3, values=[1200], datatype=DataType.UINT16),
                SimData(4, values=[70000], datatype=DataType.UINT32),
            ],
            [SimData(0, values=[1234, 7], datatype=DataType.REGISTERS)],
        ),
    )


@asynccontextmanager
async def pymodbus_server(port: int, device: SimDevice) -> Any:
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    try:
        yield server
    finally:
        await server.shutdown()


#: modbus-tk 1.1.5's server thread calls ``Event.isSet()``, deprecated since Python 3.10; the
#: warning would be raised as an error inside that thread (warnings are errors in this suite).
MODBUS_TK_ISSET = pytest.mark.filterwarnings(r"ignore:isSet\(\) is deprecated:DeprecationWarning")


@contextmanager
def modbus_tk_server(port: int) -> Iterator[Any]:
    """modbus-tk's TCP server (own thread) holding the ``EXPECTED`` values."""
    server = modbus_tcp.TcpServer(port=port, address="127.0.0.1")
    server.start()
    try:
        wait_port(port, timeout_s=5.0)
        slave = server.add_slave(1)
        slave.add_block("hr", cst.HOLDING_REGISTERS, 0, 6)
        slave.add_block("ir", cst.ANALOG_INPUTS, 0, 2)
        slave.add_block("co", cst.COILS, 0, 3)
        slave.add_block("di", cst.DISCRETE_INPUTS, 0, 1)
        words = struct.unpack(">6H", struct.pack(">fhHI", 38.25, -456, 1200, 70000))
        slave.set_values("hr", 0, list(words))
        slave.set_values("ir", 0, [1234, 7])
        slave.set_values("co", 0, [0, 1, 0])
        slave.set_values("di", 0, [0])
        yield server
    finally:
        server.stop()


def test_reads_float32_int16_uint16_uint32_and_bits_with_scale_from_a_pymodbus_server(
    client: TcpClient,
) -> None:
    async def main() -> None:
        port = free_port()
        async with pymodbus_server(port, pymodbus_device()):
            device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, timeout_s=1.0, client=client)
            await device.connect()
            try:
                first = await device.read()
                second = await device.read()
            finally:
                await device.close()
        for result in (first, second):
            assert result.values.dtype == np.float64 and result.quality.dtype == np.uint8
            assert result.values.tolist() == pytest.approx(EXPECTED)
            assert result.quality.tolist() == [GOOD] * len(REGISTERS)
            assert result.exceptions == ()

    asyncio.run(main())


@MODBUS_TK_ISSET
def test_reads_the_same_values_from_a_modbus_tk_server(client: TcpClient) -> None:
    async def main() -> list[float]:
        device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, timeout_s=1.0, client=client)
        await device.connect()
        try:
            result = await device.read()
        finally:
            await device.close()
        assert result.quality.tolist() == [GOOD] * len(REGISTERS)
        values: list[float] = result.values.tolist()
        return values

    port = free_port()
    with modbus_tk_server(port):
        assert asyncio.run(main()) == pytest.approx(EXPECTED)


def test_an_exception_response_marks_only_that_reads_values_bad(client: TcpClient) -> None:
    registers = (
        *REGISTERS,
        Register(name="beyond", address=50, type="float32", table="input"),
    )

    async def main() -> None:
        port = free_port()
        async with pymodbus_server(port, pymodbus_device()):
            device = ModbusTcpDevice("127.0.0.1", port, 1, registers, timeout_s=1.0, client=client)
            await device.connect()
            try:
                result = await device.read()
                again = await device.read()  # the connection survived the exception
            finally:
                await device.close()
        for r in (result, again):
            assert r.values[:-1].tolist() == pytest.approx(EXPECTED)
            assert r.quality.tolist() == [GOOD] * len(REGISTERS) + [BAD]
            assert math.isnan(r.values[-1])
            (refused,) = r.exceptions
            assert isinstance(refused, DeviceException)
            assert (refused.table, refused.address, refused.count) == ("input", 50, 2)
            assert (refused.function_code, refused.exception_code) == (4, 2)
            assert "illegal data address" in str(refused)

    asyncio.run(main())


@MODBUS_TK_ISSET
def test_modbus_tk_exception_responses_are_reported_the_same_way(client: TcpClient) -> None:
    registers = (*REGISTERS, Register(name="beyond", address=40, table="holding"))

    async def main() -> None:
        device = ModbusTcpDevice("127.0.0.1", port, 1, registers, timeout_s=1.0, client=client)
        await device.connect()
        try:
            result = await device.read()
        finally:
            await device.close()
        assert result.quality.tolist() == [GOOD] * len(REGISTERS) + [BAD]
        assert [e.exception_code for e in result.exceptions] == [2]

    port = free_port()
    with modbus_tk_server(port):
        asyncio.run(main())


def test_connection_refused_raises_device_unavailable(client: TcpClient) -> None:
    async def main() -> None:
        device = ModbusTcpDevice(
            "127.0.0.1", free_port(), 1, REGISTERS, timeout_s=1.0, client=client
        )
        with pytest.raises(DeviceUnavailable, match="cannot connect to 127.0.0.1:.*refused"):
            await device.connect()
        assert not device.connected
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await device.read()
        await device.close()

    asyncio.run(main())


def test_a_peer_that_never_answers_raises_device_unavailable_after_the_timeout(
    client: TcpClient,
) -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()  # swallow requests until the client hangs up
            finally:
                writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, timeout_s=0.2, client=client)
        try:
            await device.connect()
            started = time.monotonic()
            with pytest.raises(DeviceUnavailable, match="no answer within the timeout"):
                await device.read()
            assert 0.15 < time.monotonic() - started < 1.0  # one timeout, no pymodbus retries
            assert not device.connected
        finally:
            await device.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_server_going_away_raises_device_unavailable_and_connect_recovers(
    client: TcpClient,
) -> None:
    async def main() -> None:
        port = free_port()
        device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, timeout_s=1.0, client=client)
        try:
            async with pymodbus_server(port, pymodbus_device()):
                await device.connect()
                assert (await device.read()).quality.tolist() == [GOOD] * len(REGISTERS)
            started = time.monotonic()
            with pytest.raises(DeviceUnavailable):
                await device.read()
            assert time.monotonic() - started < 0.5  # noticed at once, not after the timeout
            assert not device.connected
            async with pymodbus_server(port, pymodbus_device()):
                await device.connect()
                assert (await device.read()).values.tolist() == pytest.approx(EXPECTED)
        finally:
            await device.close()

    asyncio.run(main())


def test_construction_does_no_io_and_close_is_idempotent(client: TcpClient) -> None:
    device = ModbusTcpDevice(
        "192.0.2.1", 502, 1, REGISTERS, client=client
    )  # TEST-NET: nothing answers there
    assert not device.connected
    assert [(r.table, r.address, r.count) for r in device.requests] == [
        ("coil", 1, 1),
        ("discrete", 0, 1),
        ("holding", 0, 6),
        ("input", 0, 1),
    ]

    async def main() -> None:
        await device.close()
        await device.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"registers": ()}, "at least one register", id="no registers"),
        pytest.param({"port": 0}, "port", id="port 0"),
        pytest.param({"unit_id": 256}, "unit_id", id="unit id too large"),
        pytest.param({"timeout_s": 0.0}, "timeout_s", id="zero timeout"),
        pytest.param({"client": "libmodbus"}, "client must be one of", id="unknown client"),
    ],
)
def test_construction_rejects_unusable_settings(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 502,
        "unit_id": 1,
        "registers": REGISTERS,
        "timeout_s": 1.0,
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ModbusTcpDevice(**settings)


def test_writes_of_registers_and_coils_round_trip_and_refusals_raise(client: TcpClient) -> None:
    async def main() -> None:
        port = free_port()
        async with pymodbus_server(port, pymodbus_device()):
            device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, timeout_s=1.0, client=client)
            await device.connect()
            try:
                await device.write_registers(2, [0xFF9C, 77])  # load -10.0, speed 77
                await device.write_register(5, 3)  # parts = 0x0001_0003 * 2 + 1
                await device.write_coils(0, [True, False])
                await device.write_coil(2, True)
                with pytest.raises(DeviceException, match="exception 2 .illegal data address."):
                    await device.write_registers(60000, [1])
                result = await device.read()
            finally:
                await device.close()
            with pytest.raises(DeviceUnavailable, match="not connected"):
                await device.write_coil(0, True)
        assert result.values.tolist() == pytest.approx(
            [38.25, -10.0, 77.0, 65539 * 2 + 1.0, 12.34, 0.0, 0.0]
        )
        assert result.quality.tolist() == [GOOD] * len(REGISTERS)

    asyncio.run(main())


def test_poll_groups_are_planned_and_read_separately(client: TcpClient) -> None:
    registers = (
        Register(name="temp", address=0, type="float32"),
        Register(name="speed", address=3, type="uint16", group="slow"),
        Register(name="load", address=2, type="int16", scale=0.1),
    )

    async def main() -> None:
        port = free_port()
        async with pymodbus_server(port, pymodbus_device()):
            device = ModbusTcpDevice("127.0.0.1", port, 1, registers, timeout_s=1.0, client=client)
            await device.connect()
            try:
                fast, slow = await device.read("fast"), await device.read("slow")
                with pytest.raises(KeyError, match="no poll group 'medium'"):
                    await device.read("medium")
            finally:
                await device.close()
        assert device.groups == ("fast", "slow")
        assert [(r.address, r.count) for r in device.requests] == [(0, 3), (3, 1)]
        assert fast.channels is not None and fast.channels.tolist() == [0, 2]
        assert fast.values.tolist() == pytest.approx([38.25, -45.6])
        assert slow.channels is not None and slow.channels.tolist() == [1]
        assert slow.values.tolist() == [1200.0]

    asyncio.run(main())


@pytest.mark.parametrize(
    "body",
    [
        bytes([0]),
        bytes([2, 0, 7]),
        bytes([4, 0x12, 0x34, 0xFF, 0xFF]),
        bytes([3, 0, 1, 9]),  # odd byte count: the last byte is ignored
        bytes([100]) + bytes(range(100)),
        bytes([100]) + bytes(range(100)) + b"\x00",  # trailing byte after the registers
    ],
)
def test_register_replies_decode_as_pymodbus_decodes_them_in_one_unpack(body: bytes) -> None:
    for fast, slow in (
        (HoldingRegistersResponse(), ReadHoldingRegistersResponse()),
        (InputRegistersResponse(), ReadInputRegistersResponse()),
    ):
        fast.decode(body)
        slow.decode(body)
        assert fast.registers == slow.registers


@pytest.mark.parametrize("body", [bytes([2, 0]), bytes([6, 0, 1, 0, 2]), bytes([1])])
def test_a_register_reply_whose_byte_count_runs_past_it_is_refused_like_pymodbus(
    body: bytes,
) -> None:
    with pytest.raises(ModbusIOException):
        ReadHoldingRegistersResponse().decode(body)
    with pytest.raises(ModbusIOException):
        HoldingRegistersResponse().decode(body)
