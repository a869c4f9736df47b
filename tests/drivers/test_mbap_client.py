"""The native Modbus TCP client (``drivers/modbus/mbap.py``) against peers that misbehave.

Each test runs a tiny asyncio TCP server on localhost that reads real MBAP requests and answers
as the test scripts it: split frames, a stale transaction id, nonsense in the header, an
exception response, silence, a closed socket. The well-behaved cases against pymodbus' and
modbus-tk's servers are in ``test_tcp_device.py`` (run with both clients).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import modbus_tk.defines as cst
import pytest
from conftest import free_port, wait_port
from modbus_tk import modbus_tcp

from drivers.errors import DeviceException, DeviceUnavailable
from drivers.modbus import framing
from drivers.modbus.registers import Register
from drivers.modbus.tcp import CLIENTS, ModbusTcpDevice, TcpClient
from drivers.quality import BAD, GOOD

REGISTERS = (
    Register(name="speed", address=0, type="uint16"),
    Register(name="load", address=1, type="int16", scale=0.1),
)
WORDS = (1200, 0xFE3C)  # load = -452 * 0.1
VALUES = [1200.0, -45.2]

#: What a scripted peer does with one request: the byte chunks to send back (each written on
#: its own, ``PAUSE_S`` apart; a float in the list: a pause of that many seconds), or ``None``
#: to stay silent, or ``CLOSE`` to hang up.
CLOSE = "close"
Script = Callable[[int, int, bytes], "list[bytes | float] | list[bytes] | str | None"]
PAUSE_S = 0.02


def frame(tid: int, unit: int, pdu: bytes, protocol: int = 0, length: int | None = None) -> bytes:
    """An MBAP frame built by hand (``struct``, not the code under test)."""
    size = len(pdu) + 1 if length is None else length
    return struct.pack(">HHHB", tid, protocol, size, unit) + pdu


def registers_reply(fc: int = 3, words: tuple[int, ...] = WORDS) -> bytes:
    return bytes((fc, 2 * len(words))) + struct.pack(f">{len(words)}H", *words)


def good(tid: int, unit: int, pdu: bytes) -> list[bytes]:
    return [frame(tid, unit, registers_reply(pdu[0]))]


@asynccontextmanager
async def scripted_peer(script: Script) -> AsyncIterator[tuple[int, list[int]]]:
    """A server answering each request as ``script`` says; yields its port and the
    transaction ids it received."""
    tids: list[int] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                tids.append(tid)
                answer = script(tid, unit, pdu)
                if answer == CLOSE:
                    break
                for i, chunk in enumerate(answer or []):
                    if isinstance(chunk, float):
                        await asyncio.sleep(chunk)
                        continue
                    if i:
                        await asyncio.sleep(PAUSE_S)
                    writer.write(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], tids
    finally:
        server.close()
        await server.wait_closed()
        if handlers:  # each sees the client hang up (EOF) and returns
            await asyncio.wait(handlers, timeout=5.0)


def run_against(
    script: Script,
    body: Callable[[ModbusTcpDevice], Awaitable[Any]],
    timeout_s: float = 1.0,
    unit_id: int = 1,
) -> tuple[Any, ModbusTcpDevice, list[int]]:
    """Connect a native-client device to a scripted peer, run ``body``, close."""

    async def main() -> tuple[Any, ModbusTcpDevice, list[int]]:
        async with scripted_peer(script) as (port, tids):
            device = ModbusTcpDevice("127.0.0.1", port, unit_id, REGISTERS, timeout_s=timeout_s)
            await device.connect()
            try:
                return await body(device), device, tids
            finally:
                await device.close()

    return asyncio.run(main())


def no_error_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing above WARNING, and no traceback above DEBUG (asyncio's "Fatal error" included)."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]


# -- the well-formed cases ---------------------------------------------------------------------


def test_a_reply_split_across_many_segments_is_reassembled() -> None:
    def bytewise(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        whole = frame(tid, unit, registers_reply())
        return [whole[:3], whole[3:7], whole[7:8], whole[8:]]

    result, _, _ = run_against(bytewise, lambda d: d.read())
    assert result.values.tolist() == pytest.approx(VALUES)
    assert result.quality.tolist() == [GOOD, GOOD]


def test_a_stale_reply_before_the_answer_is_discarded_and_counted() -> None:
    def stale_first(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        stale = frame(tid - 1 or 0xFFFF, unit, registers_reply(words=(1, 2)))
        return [stale + frame(tid, unit, registers_reply())]  # both in one segment

    async def two_reads(device: ModbusTcpDevice) -> list[Any]:
        return [await device.read(), await device.read()]

    results, device, _ = run_against(stale_first, two_reads)
    for result in results:
        assert result.values.tolist() == pytest.approx(VALUES)
    assert device.discarded_replies == 2
    assert device.malformed_replies == 0


def test_a_reply_with_another_transaction_id_is_never_taken_for_the_answer() -> None:
    def wrong_tid(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        return [frame(tid + 1, unit, registers_reply())]

    async def read_fails(device: ModbusTcpDevice) -> None:
        with pytest.raises(DeviceUnavailable, match="no answer within the timeout"):
            await device.read()
        assert not device.connected

    _, device, _ = run_against(wrong_tid, read_fails, timeout_s=0.2)
    assert device.discarded_replies == 1


def test_transaction_ids_count_up_and_wrap_to_one_after_65535() -> None:
    async def reads(device: ModbusTcpDevice) -> None:
        await device.read()
        assert device._native is not None
        device._native._tid = 0xFFFE  # skip ahead instead of sending 65 534 requests
        for _ in range(3):
            assert (await device.read()).quality.tolist() == [GOOD, GOOD]

    _, _, tids = run_against(good, reads)
    assert tids == [1, 0xFFFF, 1, 2]


def test_requests_from_two_tasks_take_turns_on_the_one_connection() -> None:
    def answer(tid: int, unit: int, pdu: bytes) -> list[bytes | float]:
        if pdu[0] == 3:
            return [0.05, frame(tid, unit, registers_reply())]  # slow enough to overlap
        return [frame(tid, unit, pdu)]  # a write: the echo

    async def read_and_write(device: ModbusTcpDevice) -> Any:
        return await asyncio.gather(
            device.read(), device.write_register(1, 5), device.read(), device.write_coil(3, True)
        )

    (first, _, second, _), device, tids = run_against(answer, read_and_write)
    assert first.values.tolist() == second.values.tolist() == pytest.approx(VALUES)
    assert tids == [1, 2, 3, 4]  # one after the other, none lost or matched to another
    assert device.discarded_replies == device.malformed_replies == 0


def test_an_exception_response_fails_only_that_request_and_keeps_the_connection() -> None:
    def refuse_first(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        if tid == 1:
            return [frame(tid, unit, bytes((pdu[0] | 0x80, 6)))]  # server device busy
        return good(tid, unit, pdu)

    async def read_twice(device: ModbusTcpDevice) -> list[Any]:
        device.busy_retry_delay_s = 0.0
        return [await device.read(), device.busy_retries, device.connected]

    (result, retries, connected), _, tids = run_against(refuse_first, read_twice)
    assert result.values.tolist() == pytest.approx(VALUES)  # the busy retry got the values
    assert (retries, connected, tids) == (1, True, [1, 2])

    def refuse_always(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        return [frame(tid, unit, bytes((pdu[0] | 0x80, 2)))]

    async def read_refused(device: ModbusTcpDevice) -> Any:
        result = await device.read()
        assert device.connected
        return result

    result, _, _ = run_against(refuse_always, read_refused)
    assert result.quality.tolist() == [BAD, BAD]
    (refused,) = result.exceptions
    assert (refused.function_code, refused.exception_code) == (3, 2)
    assert "exception 2 (illegal data address)" in str(refused)


def test_a_read_answered_with_too_few_registers_marks_its_values_bad() -> None:
    def short(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        return [frame(tid, unit, registers_reply(words=(7,)))]

    async def read(device: ModbusTcpDevice) -> Any:
        result = await device.read()
        assert device.connected
        return result

    result, _, _ = run_against(short, read)
    assert result.quality.tolist() == [BAD, BAD]
    assert "answered 1 values" in str(result.exceptions[0])


# -- the failures ------------------------------------------------------------------------------

MALFORMED: dict[str, Callable[[int, int, bytes], bytes]] = {
    "length field 0": lambda tid, unit, pdu: frame(tid, unit, b"", length=0),
    "length field past any PDU": lambda tid, unit, pdu: frame(tid, unit, b"\x03", length=300),
    "protocol id not 0": lambda tid, unit, pdu: frame(tid, unit, registers_reply(), protocol=1),
    "byte count past the frame": lambda tid, unit, pdu: frame(tid, unit, b"\x03\x08\x00\x01"),
    "read reply without a byte count": lambda tid, unit, pdu: frame(tid, unit, b"\x03"),
    "another function code": lambda tid, unit, pdu: frame(tid, unit, registers_reply(fc=4)),
    "exception reply of 3 bytes": lambda tid, unit, pdu: frame(tid, unit, b"\x83\x02\x00"),
    "another unit": lambda tid, unit, pdu: frame(tid, unit + 1, registers_reply()),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_reply_fails_the_request_at_once_and_closes_the_connection(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        return [MALFORMED[kind](tid, unit, pdu)]

    async def read_fails(device: ModbusTcpDevice) -> float:
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match=r"127\.0\.0\.1:\d+: malformed reply: "):
            await device.read()
        assert not device.connected
        return time.monotonic() - started

    with caplog.at_level(logging.DEBUG):
        elapsed, device, _ = run_against(answer, read_fails, timeout_s=2.0)
    assert elapsed < 1.0  # not the timeout
    assert device.malformed_replies == 1
    no_error_logs(caplog)


def test_a_peer_closing_mid_request_fails_it_at_once() -> None:
    async def read_fails(device: ModbusTcpDevice) -> float:
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="connection lost"):
            await device.read()
        assert not device.connected
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await device.read()
        return time.monotonic() - started

    elapsed, _, _ = run_against(lambda tid, unit, pdu: CLOSE, read_fails, timeout_s=2.0)
    assert elapsed < 1.0


def test_a_silent_peer_times_out_once_and_a_late_answer_is_never_read() -> None:
    requests = 0

    def late_once(tid: int, unit: int, pdu: bytes) -> list[bytes | float]:
        nonlocal requests
        requests += 1
        if requests == 1:  # the answer comes 0.3 s after the request, past the timeout
            return [0.3, frame(tid, unit, registers_reply(words=(1, 2)))]
        return [frame(tid, unit, registers_reply())]

    async def read_times_out(device: ModbusTcpDevice) -> float:
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="no answer within the timeout"):
            await device.read()
        elapsed = time.monotonic() - started
        assert not device.connected
        await device.connect()  # the supervisor's reconnect: a fresh connection
        assert (await device.read()).values.tolist() == pytest.approx(VALUES)
        await asyncio.sleep(0.3)  # the late answer went to the closed connection
        assert (await device.read()).values.tolist() == pytest.approx(VALUES)
        return elapsed

    elapsed, device, tids = run_against(late_once, read_times_out, timeout_s=0.1)
    assert 0.08 < elapsed < 0.3
    assert tids == [1, 1, 2]  # one request per timeout: no resend
    assert device.discarded_replies == 0


def test_a_write_reply_that_does_not_echo_the_request_is_refused_and_keeps_the_connection() -> None:
    def bad_echo(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        return [frame(tid, unit, pdu[:1] + b"\x00\x09" + pdu[3:5])]  # another address

    async def write(device: ModbusTcpDevice) -> None:
        with pytest.raises(DeviceException, match="write FC 6 at 1: garbled reply: .*echo"):
            await device.write_register(1, 5)
        assert device.connected

    run_against(bad_echo, write)


# -- writes against modbus-tk (the reads are in test_tcp_device.py) ---------------------------


#: modbus-tk 1.1.5's server thread calls ``Event.isSet()``, deprecated since Python 3.10.
@pytest.mark.filterwarnings(r"ignore:isSet\(\) is deprecated:DeprecationWarning")
@pytest.mark.parametrize("client", CLIENTS)
def test_writes_round_trip_through_a_modbus_tk_server(client: TcpClient) -> None:
    port = free_port()
    server = modbus_tcp.TcpServer(port=port, address="127.0.0.1")
    server.start()
    try:
        wait_port(port, timeout_s=5.0)
        slave = server.add_slave(1)
        slave.add_block("hr", cst.HOLDING_REGISTERS, 0, 4)
        slave.add_block("co", cst.COILS, 0, 10)

        async def main() -> tuple[list[int], list[int]]:
            device = ModbusTcpDevice("127.0.0.1", port, 1, REGISTERS, client=client)
            await device.connect()
            try:
                await device.write_register(0, 1200)
                await device.write_registers(1, [0xFE3C, 9])
                await device.write_coil(9, True)
                await device.write_coils(0, [True, False, True])
                with pytest.raises(DeviceException, match="exception 2"):
                    await device.write_registers(100, [1])
                words = await device.read_raw("holding", 0, 3)
                bits = await device.read_raw("coil", 0, 10)
                return words, bits
            finally:
                await device.close()

        words, bits = asyncio.run(main())
        assert words == [1200, 0xFE3C, 9]
        assert list(slave.get_values("hr", 0, 3)) == words
        assert bits == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    finally:
        server.stop()


# -- the pure framing of TCP -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pdu", "wire"),
    [
        pytest.param(framing.read_pdu(3, 0x6B, 3), "00 01 00 00 00 06 11 03 00 6B 00 03", id="FC3"),
        pytest.param(
            framing.read_pdu(1, 0x13, 0x25), "00 01 00 00 00 06 11 01 00 13 00 25", id="FC1"
        ),
        pytest.param(
            framing.write_single_coil_pdu(0xAC, True),
            "00 01 00 00 00 06 11 05 00 AC FF 00",
            id="FC5",
        ),
        pytest.param(
            framing.write_multiple_registers_pdu(1, [0x000A, 0x0102]),
            "00 01 00 00 00 0B 11 10 00 01 00 02 04 00 0A 01 02",
            id="FC16",
        ),
        pytest.param(
            framing.write_multiple_coils_pdu(
                0x13, [True, False, True, True, False, False, True, True, True, False]
            ),
            "00 01 00 00 00 09 11 0F 00 13 00 0A 02 CD 01",
            id="FC15",
        ),
    ],
)
def test_mbap_frames_carry_the_pdu_behind_a_seven_byte_header(pdu: bytes, wire: str) -> None:
    assert framing.mbap_frame(1, 0x11, pdu) == bytes.fromhex(wire)


@pytest.mark.parametrize(
    ("head", "fc", "length"),
    [
        pytest.param("", 3, None, id="nothing yet"),
        pytest.param("03", 3, None, id="read needs its byte count"),
        pytest.param("03 14", 3, 22, id="read of 10 registers"),
        pytest.param("83", 3, 2, id="exception reply"),
        pytest.param("10", 16, 5, id="write multiple registers echo"),
    ],
)
def test_pdu_reply_length_follows_the_function_code(head: str, fc: int, length: int | None) -> None:
    assert framing.pdu_reply_length(bytes.fromhex(head), fc) == length
