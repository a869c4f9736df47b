"""Pure table tests of RTU framing (drivers.modbus.framing): CRC, requests, reply sizing and
checks. Known frames are from the Modbus specifications and from captures of other
implementations, never produced by the code under test."""

from __future__ import annotations

import pytest

from drivers.modbus import framing
from drivers.modbus.framing import FrameError


def h(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.mark.parametrize(
    ("frame", "crc"),
    [
        pytest.param("01 03 00 00 00 0A", 0xCDC5, id="read 10 holding registers of unit 1"),
        pytest.param("02 07", 0x1241, id="spec example: read exception status of unit 2"),
        pytest.param("11 03 00 6B 00 03", 0x8776, id="unit 17 reads 3 registers from 107"),
        pytest.param("01 04 02 FF FF", 0x80B8, id="a reply carrying 0xFFFF"),
        pytest.param("", 0xFFFF, id="empty input is the initial value"),
    ],
)
def test_crc16_matches_known_frames(frame: str, crc: int) -> None:
    assert framing.crc16(h(frame)) == crc


def test_crc_travels_low_byte_first_and_checks_round_trip() -> None:
    adu = framing.with_crc(h("01 03 00 00 00 0A"))
    assert adu == h("01 03 00 00 00 0A C5 CD")
    assert framing.check_crc(adu)
    assert not framing.check_crc(adu[:-1] + b"\xce")
    assert not framing.check_crc(b"\x01\x03")


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        pytest.param(
            lambda: framing.read_request(1, 3, 0, 10), "01 03 00 00 00 0A C5 CD", id="FC3 spec"
        ),
        pytest.param(
            lambda: framing.read_request(0x11, 3, 0x6B, 3), "11 03 00 6B 00 03 76 87", id="FC3"
        ),
        pytest.param(
            lambda: framing.read_request(1, 1, 0x13, 0x25), "01 01 00 13 00 25 0C 14", id="FC1"
        ),
        pytest.param(
            lambda: framing.read_request(1, 2, 0xC4, 0x16), "01 02 00 C4 00 16 B8 39", id="FC2"
        ),
        pytest.param(lambda: framing.read_request(1, 4, 8, 1), "01 04 00 08 00 01 B0 08", id="FC4"),
        pytest.param(
            lambda: framing.write_single_coil(1, 0xAC, True), "01 05 00 AC FF 00 4C 1B", id="FC5"
        ),
        pytest.param(
            lambda: framing.write_single_register(1, 1, 3), "01 06 00 01 00 03 98 0B", id="FC6"
        ),
        pytest.param(
            lambda: framing.write_multiple_coils(
                1, 0x13, [True, False, True, True, False, False, True, True, True, False]
            ),
            "01 0F 00 13 00 0A 02 CD 01 72 CB",
            id="FC15 spec example",
        ),
        pytest.param(
            lambda: framing.write_multiple_registers(1, 1, [0x000A, 0x0102]),
            "01 10 00 01 00 02 04 00 0A 01 02 92 30",
            id="FC16 spec example",
        ),
    ],
)
def test_requests_are_built_byte_for_byte(built: object, expected: str) -> None:
    assert callable(built)
    assert built() == h(expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: framing.read_request(248, 3, 0, 1), "unit id", id="unit 248"),
        pytest.param(lambda: framing.read_request(1, 5, 0, 1), "not a read", id="FC5 read"),
        pytest.param(lambda: framing.read_request(1, 3, 0, 126), "count", id="126 registers"),
        pytest.param(lambda: framing.read_request(1, 1, 0, 2001), "count", id="2001 bits"),
        pytest.param(lambda: framing.read_request(1, 3, 65535, 2), "outside", id="past 65535"),
        pytest.param(lambda: framing.write_single_register(1, 0, 70000), "16-bit", id="big"),
        pytest.param(lambda: framing.write_multiple_registers(1, 0, []), "count", id="none"),
    ],
)
def test_impossible_requests_are_refused(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("head", "fc", "length"),
    [
        pytest.param("", 3, None, id="nothing yet"),
        pytest.param("01", 3, None, id="address only"),
        pytest.param("01 03", 3, None, id="read needs its byte count"),
        pytest.param("01 03 14", 3, 25, id="read of 10 registers"),
        pytest.param("01 01 05", 1, 10, id="read of 37 coils"),
        pytest.param("01 83", 3, 5, id="exception reply"),
        pytest.param("01 90", 16, 5, id="exception to a write"),
        pytest.param("01 06", 6, 8, id="write single register echo"),
        pytest.param("01 0F", 15, 8, id="write multiple coils reply"),
    ],
)
def test_reply_length_follows_the_function_code(head: str, fc: int, length: int | None) -> None:
    assert framing.reply_length(h(head), fc) == length


def test_reply_length_rejects_a_foreign_function_code_as_garbage() -> None:
    with pytest.raises(FrameError, match="function code 0x04, expected 0x03"):
        framing.reply_length(h("01 04 02"), 3)


REPLY_FC3 = framing.with_crc(h("11 03 06 AE 41 56 52 43 40"))  # spec: 3 registers of unit 17


def test_a_read_reply_parses_into_registers() -> None:
    reply = framing.parse_reply(REPLY_FC3, 0x11, 3)
    assert (reply.unit, reply.function_code, reply.exception_code) == (0x11, 3, 0)
    assert framing.registers_of(reply, 3) == [0xAE41, 0x5652, 0x4340]


def test_a_coil_reply_unpacks_lsb_first_and_ignores_padding() -> None:
    reply = framing.parse_reply(framing.with_crc(h("01 01 03 CD 6B 05")), 1, 1)
    bits = framing.bits_of(reply, 19)  # spec example: coils 20..38
    assert bits == [bool(int(c)) for c in "1011001111010110101"]


def test_an_exception_reply_carries_its_code() -> None:
    reply = framing.parse_reply(framing.with_crc(h("0A 81 02")), 10, 1)
    assert reply.exception_code == 2 and reply.data == b""


@pytest.mark.parametrize(
    ("adu", "unit", "fc", "message"),
    [
        pytest.param(REPLY_FC3[:-1] + b"\x00", 0x11, 3, "bad CRC", id="corrupted CRC"),
        pytest.param(
            bytes(REPLY_FC3[:5]) + b"\xff" + REPLY_FC3[6:],
            0x11,
            3,
            "bad CRC",
            id="flipped data byte",
        ),
        pytest.param(REPLY_FC3, 0x12, 3, "from unit 17, expected 18", id="another unit"),
        pytest.param(REPLY_FC3, 0x11, 4, "function code", id="another function"),
        pytest.param(h("11 03"), 0x11, 3, "too short", id="truncated"),
        pytest.param(
            framing.with_crc(h("11 03 08 00 01")),
            0x11,
            3,
            "header says 13",
            id="byte count larger than the frame",
        ),
        pytest.param(h("de ad be ef 00"), 0xDE, 3, "bad CRC", id="line noise"),
    ],
)
def test_garbage_replies_raise_frame_errors(adu: bytes, unit: int, fc: int, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        framing.parse_reply(adu, unit, fc)


def test_a_reply_with_the_wrong_number_of_values_is_garbage() -> None:
    reply = framing.parse_reply(REPLY_FC3, 0x11, 3)
    with pytest.raises(FrameError, match="read of 2 registers answered 6 bytes"):
        framing.registers_of(reply, 2)
    with pytest.raises(FrameError, match="bits"):
        framing.bits_of(reply, 9)


def test_a_write_reply_must_echo_the_request() -> None:
    request = framing.write_single_register(1, 1, 3)
    framing.check_write_echo(framing.parse_reply(request, 1, 6), request)
    other = framing.parse_reply(framing.write_single_register(1, 1, 4), 1, 6)
    with pytest.raises(FrameError, match="does not echo"):
        framing.check_write_echo(other, request)


@pytest.mark.parametrize(
    ("baud", "parity", "gap_ms"),
    [
        pytest.param(9600, "E", 3.5 * 11 / 9600 * 1000, id="9600 8E1: 11 bits a character"),
        pytest.param(9600, "N", 3.5 * 10 / 9600 * 1000, id="9600 8N1: 10 bits"),
        pytest.param(19200, "E", 3.5 * 11 / 19200 * 1000, id="19200 8E1"),
        pytest.param(38400, "E", 1.75, id="fixed 1.75 ms above 19200 baud"),
        pytest.param(115200, "N", 1.75, id="115200"),
    ],
)
def test_the_inter_frame_gap_is_three_and_a_half_characters(
    baud: int, parity: str, gap_ms: float
) -> None:
    assert framing.inter_frame_gap_s(baud, 8, parity, 1) * 1000 == pytest.approx(gap_ms)
