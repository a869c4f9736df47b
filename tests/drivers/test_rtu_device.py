"""ModbusRtuDevice and RtuBus against real peers: pymodbus' serial server and modbus-tk's RTU
server (an independent implementation) on a socat pseudo-terminal pair, pymodbus' TCP server
with the RTU framer behind a ``socket://`` URL (RTU over TCP, as through a serial gateway), and
small responders on a pty for what no real server does on purpose (corrupted CRCs, line noise,
local echo, "busy" exceptions).

Server-side values are encoded by the servers' own code (pymodbus SimData types) or by
``struct`` (modbus-tk), never by our codec.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import modbus_tk.defines as cst
import pytest
import serial
from conftest import free_port
from modbus_tk import modbus_rtu
from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.errors import DeviceException, DeviceUnavailable
from drivers.modbus import framing
from drivers.modbus.registers import Register
from drivers.modbus.rtu import ModbusRtuDevice
from drivers.modbus.transport import RtuBus
from drivers.quality import BAD, GOOD

pytestmark = pytest.mark.pty

REGISTERS = (
    Register(name="temp", address=0, type="float32"),
    Register(name="load", address=2, type="int16", scale=0.1),
    Register(name="unit", address=3, type="uint16"),
    Register(name="pressure", address=0, type="uint16", table="input", scale=0.01),
    Register(name="door", address=1, type="bool", table="coil"),
    Register(name="estop", address=0, type="bool", table="discrete"),
    Register(name="serial_no", address=10, type="string", length=6),
)


def expected(unit: int) -> list[float]:
    return [38.25, -45.6, float(unit), 12.34, 1.0, 0.0]


def sim_device(unit: int) -> SimDevice:
    """``expected(unit)`` laid out as ``REGISTERS`` says, encoded by pymodbus."""
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[False, True, False, False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [
                SimData(0, values=[38.25], datatype=DataType.FLOAT32),
                SimData(2, values=[-456], datatype=DataType.INT16),
                SimData(3, values=[unit, 0, 0, 0, 0, 0, 0], datatype=DataType.UINT16),
                SimData(10, values=["SN-042"], datatype=DataType.STRING),
            ],
            [SimData(0, values=[1234, 7], datatype=DataType.REGISTERS)],
        ),
    )


@asynccontextmanager
async def pymodbus_serial(port: str, units: list[int]) -> Any:
    """pymodbus' RTU server on ``port``; units not listed get no answer at all."""
    server = ModbusSerialServer(
        [sim_device(u) for u in units],
        port=port,
        baudrate=19200,
        ignore_missing_devices=True,
    )
    await server.serve_forever(background=True)
    try:
        yield server
    finally:
        await server.shutdown()


async def read_all(device: ModbusRtuDevice) -> Any:
    await device.connect()
    try:
        return await device.read()
    finally:
        await device.close()


def test_two_units_of_a_pymodbus_serial_server_share_one_bus(pty_pair: tuple[str, str]) -> None:
    ours, theirs = pty_pair

    async def main() -> None:
        async with pymodbus_serial(theirs, [1, 2]):
            bus = RtuBus(ours, baudrate=19200, parity="N")
            one, two = (ModbusRtuDevice(bus, u, REGISTERS, timeout_s=0.5) for u in (1, 2))
            for d in (one, two):
                await d.connect()
            assert one.strings == {"serial_no": "SN-042"}  # read once at connect
            results = await asyncio.gather(one.read(), two.read(), one.read(), two.read("fast"))
            for d in (one, two):
                await d.close()
            assert not bus.is_open  # the last user closed the port
            assert bus.opens == 1 and bus.no_replies == 0 and bus.garbage == 0
        for unit, result in zip((1, 2, 1, 2), results, strict=True):
            assert result.values.tolist() == pytest.approx(expected(unit))
            assert result.quality.tolist() == [GOOD] * 6 and result.exceptions == ()

    asyncio.run(main())


#: modbus-tk 1.1.5's server thread calls ``Event.isSet()``, deprecated since Python 3.10.
MODBUS_TK_ISSET = pytest.mark.filterwarnings(r"ignore:isSet\(\) is deprecated:DeprecationWarning")


@contextmanager
def modbus_tk_rtu(port: str, unit: int) -> Iterator[Any]:
    """modbus-tk's RTU server (own thread) on ``port`` holding ``expected(unit)``."""
    line = serial.Serial(port, baudrate=19200)
    server = modbus_rtu.RtuServer(line, error_on_missing_slave=False)
    slave = server.add_slave(unit)
    slave.add_block("hr", cst.HOLDING_REGISTERS, 0, 16)
    slave.add_block("ir", cst.ANALOG_INPUTS, 0, 2)
    slave.add_block("co", cst.COILS, 0, 4)
    slave.add_block("di", cst.DISCRETE_INPUTS, 0, 1)
    slave.set_values("hr", 0, list(struct.unpack(">4H", struct.pack(">fhH", 38.25, -456, unit))))
    slave.set_values("hr", 10, list(struct.unpack(">3H", b"SN-042")))
    slave.set_values("ir", 0, [1234, 7])
    slave.set_values("co", 0, [0, 1, 0, 0])
    slave.set_values("di", 0, [0])
    server.start()
    try:
        yield server
    finally:
        server.stop()
        line.close()


@MODBUS_TK_ISSET
def test_modbus_tk_rtu_server_gives_the_same_values_and_writes_round_trip(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair

    async def main() -> None:
        bus = RtuBus(ours, baudrate=19200, parity="N")
        device = ModbusRtuDevice(bus, 5, REGISTERS, timeout_s=0.5)
        await device.connect()
        try:
            result = await device.read()
            assert device.strings == {"serial_no": "SN-042"}
            await device.write_registers(2, [0xFF9C, 77])  # load -10.0, unit 77
            await device.write_coils(0, [True, False, True])
            await device.write_register(0, 0x4120)  # float32 10.0 high word
            await device.write_coil(3, True)
            written = await device.read()
        finally:
            await device.close()
        assert result.values.tolist() == pytest.approx(expected(5))
        assert result.quality.tolist() == [GOOD] * 6
        assert written.values.tolist() == pytest.approx([10.0, -10.0, 77.0, 12.34, 0.0, 0.0])

    with modbus_tk_rtu(theirs, 5) as server:
        asyncio.run(main())
        slave = server.get_slave(5)
        assert list(slave.get_values("co", 0, 4)) == [1, 0, 1, 1]


@MODBUS_TK_ISSET
def test_a_dead_unit_on_the_bus_delays_a_live_one_by_at_most_its_own_timeout(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair

    async def main() -> tuple[list[Any], float, RtuBus]:
        bus = RtuBus(ours, baudrate=19200, parity="N")
        live = ModbusRtuDevice(bus, 5, REGISTERS, timeout_s=0.5)
        dead = ModbusRtuDevice(bus, 6, REGISTERS[:-1], timeout_s=0.2)  # nobody answers unit 6
        await live.connect()
        await dead.connect()
        started = time.monotonic()
        results = await asyncio.gather(
            dead.read(), live.read(), live.read(), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        await live.close()
        await dead.close()
        return results, elapsed, bus

    with modbus_tk_rtu(theirs, 5):
        results, elapsed, bus = asyncio.run(main())
    first_dead, live_1, live_2 = results
    assert isinstance(first_dead, DeviceUnavailable)
    assert "unit 6" in str(first_dead) and "no reply within 0.2 s" in str(first_dead)
    for live in (live_1, live_2):
        assert not isinstance(live, BaseException)
        assert live.values.tolist() == pytest.approx(expected(5))
    assert bus.no_replies == 1
    assert elapsed < 0.2 + 0.4  # one timeout of the dead unit, not one per request


def test_writes_round_trip_through_a_pymodbus_serial_server(pty_pair: tuple[str, str]) -> None:
    ours, theirs = pty_pair

    async def main() -> None:
        async with pymodbus_serial(theirs, [1]):
            device = ModbusRtuDevice(RtuBus(ours, parity="N"), 1, REGISTERS, timeout_s=0.5)
            await device.connect()
            try:
                await device.write_register(3, 4242)
                await device.write_coil(1, False)
                with pytest.raises(DeviceException, match="exception 2 .illegal data address."):
                    await device.write_registers(60000, [1, 2])
                result = await device.read()
            finally:
                await device.close()
        assert result.values.tolist()[2] == 4242.0 and result.values.tolist()[4] == 0.0

    asyncio.run(main())


def test_rtu_over_tcp_reads_a_pymodbus_tcp_server_speaking_the_rtu_framer() -> None:
    async def main() -> None:
        port = free_port()
        server = ModbusTcpServer(
            [sim_device(7)], address=("127.0.0.1", port), framer=FramerType.RTU
        )
        await server.serve_forever(background=True)
        try:
            device = ModbusRtuDevice(RtuBus(f"socket://127.0.0.1:{port}"), 7, REGISTERS, 0.5)
            result = await read_all(device)
            with pytest.raises(DeviceUnavailable, match="not connected"):
                await device.write_register(3, 1)  # closed: refused before any I/O
        finally:
            await server.shutdown()
        assert result.values.tolist() == pytest.approx(expected(7))
        assert result.quality.tolist() == [GOOD] * 6

    asyncio.run(main())


class Responder:
    """A scripted RTU peer on the server end of a pty (test double: no real server sends a
    corrupted CRC, line noise or a local echo on purpose). ``answer(request)`` returns the bytes
    to send back for each request it reads."""

    def __init__(self, port: str, answer: Callable[[bytes], bytes]) -> None:
        self.line = serial.Serial(port, baudrate=19200, timeout=0.05)
        self.answer = answer
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.line.close()

    def _run(self) -> None:
        buf = b""
        while not self._stop.is_set():
            buf += self.line.read(256)
            if len(buf) >= 8 and framing.check_crc(buf[:8]):
                request, buf = buf[:8], buf[8:]
                self.requests.append(request)
                reply = self.answer(request)
                if reply:
                    self.line.write(reply)
                    self.line.flush()


HOLDING = (Register(name="a", address=0), Register(name="b", address=1, type="int16"))


def good_reply(request: bytes) -> bytes:
    unit, fc, count = request[0], request[1], int.from_bytes(request[4:6], "big")
    data = b"".join((100 + k).to_bytes(2, "big") for k in range(count))
    return framing.with_crc(bytes((unit, fc, len(data))) + data)


def test_bad_crc_and_line_noise_are_counted_values_bad_and_the_next_poll_is_good(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair
    script = iter(["bad crc", "noise", "good", "wrong unit", "good"])

    def answer(request: bytes) -> bytes:
        kind = next(script)
        reply = good_reply(request)
        if kind == "bad crc":
            return reply[:-1] + bytes((reply[-1] ^ 0xFF,))
        if kind == "noise":
            return b"\x00\xff\x13\x37" * 8
        if kind == "wrong unit":
            return framing.with_crc(bytes((9,)) + reply[1:-2])
        return reply

    async def main() -> list[Any]:
        bus = RtuBus(ours, parity="N")
        device = ModbusRtuDevice(bus, 1, HOLDING, timeout_s=0.3)
        await device.connect()
        try:
            results = [await device.read() for _ in range(5)]
        finally:
            await device.close()
        assert device.frame_errors == 3 and bus.garbage == 3
        return results

    with Responder(theirs, answer):
        results = asyncio.run(main())
    for i, result in enumerate(results):
        if i in (2, 4):
            assert result.values.tolist() == [100.0, 101.0]
            assert result.quality.tolist() == [GOOD, GOOD]
        else:
            assert result.quality.tolist() == [BAD, BAD]
            (problem,) = result.exceptions
            assert "garbled reply" in str(problem) and problem.exception_code == 0


def test_local_echo_is_read_back_and_discarded(pty_pair: tuple[str, str]) -> None:
    ours, theirs = pty_pair

    async def main() -> Any:
        bus = RtuBus(ours, parity="N", local_echo=True)  # a pty cannot do parity
        device = ModbusRtuDevice(bus, 1, HOLDING, timeout_s=0.3)
        return await read_all(device)

    with Responder(theirs, lambda req: req + good_reply(req)):
        result = asyncio.run(main())
    assert result.values.tolist() == [100.0, 101.0]


def test_a_busy_exception_is_retried_once_and_a_second_busy_is_reported(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair
    script = iter(["busy", "good", "busy", "busy"])

    def answer(request: bytes) -> bytes:
        if next(script) == "busy":
            return framing.with_crc(bytes((request[0], request[1] | 0x80, 6)))
        return good_reply(request)

    async def main() -> tuple[Any, Any, int]:
        device = ModbusRtuDevice(
            RtuBus(ours, parity="N"), 1, HOLDING, timeout_s=0.3, busy_retry_delay_s=0.01
        )
        await device.connect()
        try:
            return await device.read(), await device.read(), device.busy_retries
        finally:
            await device.close()

    with Responder(theirs, answer) as responder:
        first, second, retries = asyncio.run(main())
    assert first.quality.tolist() == [GOOD, GOOD]
    assert second.quality.tolist() == [BAD, BAD]
    assert [e.exception_code for e in second.exceptions] == [6]
    assert retries == 2 and len(responder.requests) == 4


def test_the_bus_keeps_the_inter_frame_gap_between_transactions(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair
    arrivals: list[float] = []

    def answer(request: bytes) -> bytes:
        arrivals.append(time.monotonic())
        return good_reply(request)

    async def main() -> None:
        bus = RtuBus(ours, parity="N", inter_frame_gap_ms=50)
        device = ModbusRtuDevice(bus, 1, HOLDING, timeout_s=0.3)
        await device.connect()
        try:
            for _ in range(4):
                await device.read()
        finally:
            await device.close()

    with Responder(theirs, answer):
        asyncio.run(main())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == 3 and min(gaps) >= 0.045


def test_a_port_that_does_not_exist_raises_device_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        device = ModbusRtuDevice(RtuBus(str(tmp_path / "nope")), 1, HOLDING)
        with pytest.raises(DeviceUnavailable, match="cannot open"):
            await device.connect()
        assert not device.connected
        await device.close()
        await device.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"unit_id": 0}, "1..247", id="broadcast address"),
        pytest.param({"unit_id": 248}, "1..247", id="reserved address"),
        pytest.param({"registers": ()}, "at least one register", id="no registers"),
        pytest.param({"timeout_s": 0}, "timeout_s", id="zero timeout"),
    ],
)
def test_construction_rejects_unusable_settings_and_does_no_io(
    kwargs: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"unit_id": 1, "registers": HOLDING, "timeout_s": 1.0}
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ModbusRtuDevice(RtuBus("/dev/does-not-exist"), **settings)
