"""Modbus framing: PDUs (shared by RTU and TCP), RTU ADUs (CRC) and the MBAP header of TCP.
Pure functions, no I/O.

A PDU (Modbus Application Protocol v1.1b3, section 4.1) is ``function code (1 byte) | data``;
``*_pdu`` build request PDUs, :func:`pdu_reply_length` sizes a reply PDU from its first bytes and
:func:`reply_of_pdu` splits a checked one. The two transports wrap PDUs differently:

* TCP (Modbus Messaging on TCP/IP v1.0b, section 3.1.3): an MBAP header
  ``transaction id (2) | protocol id 0 (2) | length (2) | unit id (1)`` in front of the PDU,
  ``length`` counting the unit id and the PDU (:func:`mbap_frame`, :data:`MBAP_HEADER`). Frames
  are delimited by that length field.
* RTU, below: ``unit id`` in front and a CRC-16 behind.

An RTU frame (Modbus over Serial Line v1.02, section 2.5.1) is
``unit id (1 byte) | function code (1) | data (0..252) | CRC-16 (2, low byte first)``.
Frames are delimited by silence (3.5 character times), not by a length field, so a reader must
know from the first bytes how long the reply is: :func:`reply_length` computes that from the
function code (and, for reads, the byte count), and returns ``None`` while it needs more bytes.

Function codes handled (Modbus Application Protocol v1.1b3, section 6): read coils (1),
discrete inputs (2), holding registers (3), input registers (4); write single coil (5), single
register (6), multiple coils (15), multiple registers (16). An exception reply has the request's
function code with bit 7 set and one exception-code byte.

Every check failure raises :class:`FrameError` (a bad CRC, another unit or function code, a
byte count that does not match the request); the transport counts it and flushes its input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

READ_FUNCTIONS = frozenset({1, 2, 3, 4})
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
#: Largest RTU ADU (bytes): 1 address + 253 PDU + 2 CRC.
MAX_ADU = 256
#: Largest PDU (bytes): function code + 252 data bytes.
MAX_PDU = 253
#: The MBAP header: transaction id, protocol id (0), length (unit id + PDU), unit id.
MBAP_HEADER = struct.Struct(">HHHB")


class FrameError(ValueError):
    """A reply that is not a valid answer to the request (bad CRC, garbage, wrong shape)."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (reflected polynomial 0xA001, initial value 0xFFFF) of ``data``.

    On the wire it is sent low byte first: ``crc16(b"\\x01\\x03\\x00\\x00\\x00\\x0a") == 0xCDC5``
    travels as ``C5 CD``.
    """
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def with_crc(frame: bytes) -> bytes:
    """``frame`` followed by its CRC, low byte first."""
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


def check_crc(adu: bytes) -> bool:
    """True when the last two bytes of ``adu`` are the CRC of the rest."""
    return len(adu) >= 4 and crc16(adu[:-2]) == (adu[-2] | adu[-1] << 8)


def _check_unit(unit: int) -> None:
    if not 0 <= unit <= 247:
        raise ValueError(f"RTU unit id must be in 0..247, got {unit}")


def _check_span(address: int, count: int, limit: int) -> None:
    if not 1 <= count <= limit:
        raise ValueError(f"count must be in 1..{limit}, got {count}")
    if address < 0 or address + count > 0x10000:
        raise ValueError(f"address {address} + {count} is outside 0..65535")


def read_pdu(function_code: int, address: int, count: int) -> bytes:
    """The PDU of a read (FC 1-4): ``count`` bits (FC 1/2, ≤2000) or registers (FC 3/4, ≤125)."""
    if function_code not in READ_FUNCTIONS:
        raise ValueError(f"function code {function_code} is not a read (1..4)")
    _check_span(address, count, 2000 if function_code in (1, 2) else 125)
    return bytes((function_code,)) + address.to_bytes(2, "big") + count.to_bytes(2, "big")


def write_single_register_pdu(address: int, value: int) -> bytes:
    """The PDU of FC 6: one 16-bit register."""
    _check_span(address, 1, 1)
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} is not a 16-bit word")
    return b"\x06" + address.to_bytes(2, "big") + value.to_bytes(2, "big")


def write_single_coil_pdu(address: int, value: bool) -> bytes:
    """The PDU of FC 5: one coil (``FF 00`` on, ``00 00`` off)."""
    _check_span(address, 1, 1)
    return b"\x05" + address.to_bytes(2, "big") + (b"\xff\x00" if value else b"\x00\x00")


def write_multiple_registers_pdu(address: int, values: list[int] | tuple[int, ...]) -> bytes:
    """The PDU of FC 16: 1..123 registers from ``address``."""
    _check_span(address, len(values), 123)
    if any(not 0 <= v <= 0xFFFF for v in values):
        raise ValueError("register values must be 16-bit words")
    data = b"".join(v.to_bytes(2, "big") for v in values)
    head = b"\x10" + address.to_bytes(2, "big") + len(values).to_bytes(2, "big")
    return head + bytes((len(data),)) + data


def write_multiple_coils_pdu(address: int, values: list[bool] | tuple[bool, ...]) -> bytes:
    """The PDU of FC 15: 1..1968 coils from ``address``, packed LSB first."""
    _check_span(address, len(values), 1968)
    packed = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            packed[i // 8] |= 1 << (i % 8)
    head = b"\x0f" + address.to_bytes(2, "big") + len(values).to_bytes(2, "big")
    return head + bytes((len(packed),)) + bytes(packed)


def read_request(unit: int, function_code: int, address: int, count: int) -> bytes:
    """The RTU ADU of a read (FC 1-4): see :func:`read_pdu`."""
    _check_unit(unit)
    return with_crc(bytes((unit,)) + read_pdu(function_code, address, count))


def write_single_register(unit: int, address: int, value: int) -> bytes:
    """The RTU ADU of FC 6: one 16-bit register."""
    _check_unit(unit)
    return with_crc(bytes((unit,)) + write_single_register_pdu(address, value))


def write_single_coil(unit: int, address: int, value: bool) -> bytes:
    """The RTU ADU of FC 5: one coil (``FF 00`` on, ``00 00`` off)."""
    _check_unit(unit)
    return with_crc(bytes((unit,)) + write_single_coil_pdu(address, value))


def write_multiple_registers(unit: int, address: int, values: list[int] | tuple[int, ...]) -> bytes:
    """The RTU ADU of FC 16: 1..123 registers from ``address``."""
    _check_unit(unit)
    return with_crc(bytes((unit,)) + write_multiple_registers_pdu(address, values))


def write_multiple_coils(unit: int, address: int, values: list[bool] | tuple[bool, ...]) -> bytes:
    """The RTU ADU of FC 15: 1..1968 coils from ``address``, packed LSB first."""
    _check_unit(unit)
    return with_crc(bytes((unit,)) + write_multiple_coils_pdu(address, values))


def mbap_frame(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    """The Modbus TCP ADU of ``pdu``: the MBAP header (protocol id 0) in front of it."""
    return MBAP_HEADER.pack(transaction_id, 0, len(pdu) + 1, unit) + pdu


def pdu_reply_length(head: bytes, function_code: int) -> int | None:
    """Length in bytes of the reply PDU that starts with ``head`` to a ``function_code`` request.

    Needs 1 byte for an exception or a write echo, 2 for a read (the byte count); returns
    ``None`` while ``head`` is shorter. Raises :class:`FrameError` when the function code byte is
    neither the request's nor its exception form (garbage: the rest cannot be sized).
    """
    if not head:
        return None
    fc = head[0]
    if fc == function_code | 0x80:
        return 2
    if fc != function_code:
        raise FrameError(f"reply has function code {fc:#04x}, expected {function_code:#04x}")
    if fc in WRITE_FUNCTIONS:
        return 5
    if fc in READ_FUNCTIONS:
        return None if len(head) < 2 else 2 + head[1]
    raise FrameError(f"function code {fc} is not supported")


def reply_length(head: bytes, function_code: int) -> int | None:
    """Total length in bytes of the RTU reply that starts with ``head`` to a ``function_code``
    request: unit id + :func:`pdu_reply_length` + CRC. Needs 2 bytes for an exception or a
    write echo, 3 for a read; ``None`` while ``head`` is shorter; :class:`FrameError` as there.
    """
    if len(head) < 2:
        return None
    pdu = pdu_reply_length(head[1:], function_code)
    return None if pdu is None else 1 + pdu + 2


@dataclass(frozen=True, slots=True)
class Reply:
    """A checked reply. ``exception_code`` is 0 for a normal reply; ``data`` is the PDU data
    (for reads: the bytes after the byte count; for writes: address and quantity/value)."""

    unit: int
    function_code: int
    exception_code: int
    data: bytes


def parse_reply(adu: bytes, unit: int, function_code: int) -> Reply:
    """Check one complete reply ADU against its request's unit and function code."""
    if len(adu) < 5:
        raise FrameError(f"reply of {len(adu)} bytes is too short: {adu.hex(' ')}")
    if not check_crc(adu):
        raise FrameError(f"bad CRC in reply {adu.hex(' ')}")
    if adu[0] != unit:
        raise FrameError(f"reply from unit {adu[0]}, expected {unit}")
    expected = reply_length(adu, function_code)
    if expected != len(adu):
        raise FrameError(f"reply is {len(adu)} bytes, its header says {expected}")
    return reply_of_pdu(unit, function_code, adu[1:-2])


def reply_of_pdu(unit: int, function_code: int, pdu: bytes) -> Reply:
    """The :class:`Reply` of a reply PDU already checked against ``function_code`` (its length
    matches :func:`pdu_reply_length`)."""
    if pdu[0] & 0x80:
        return Reply(unit, function_code, pdu[1], b"")
    if function_code in READ_FUNCTIONS:
        return Reply(unit, function_code, 0, pdu[2:])
    return Reply(unit, function_code, 0, pdu[1:])


def registers_of(reply: Reply, count: int) -> list[int]:
    """The ``count`` 16-bit registers of an FC 3/4 reply; raises :class:`FrameError` if short."""
    if len(reply.data) != 2 * count:
        raise FrameError(f"read of {count} registers answered {len(reply.data)} bytes")
    return [reply.data[i] << 8 | reply.data[i + 1] for i in range(0, 2 * count, 2)]


def bits_of(reply: Reply, count: int) -> list[bool]:
    """The ``count`` bits of an FC 1/2 reply (LSB of the first byte first)."""
    if len(reply.data) != (count + 7) // 8:
        raise FrameError(f"read of {count} bits answered {len(reply.data)} bytes")
    return [bool(reply.data[i // 8] >> (i % 8) & 1) for i in range(count)]


def check_write_echo(reply: Reply, request: bytes) -> None:
    """A write reply echoes the request's address and quantity/value (RTU ADU bytes 2..5)."""
    check_write_echo_pdu(reply, request[1:])


def check_write_echo_pdu(reply: Reply, request: bytes) -> None:
    """:func:`check_write_echo` for a request PDU (bytes 1..4)."""
    if reply.data[:4] != request[1:5]:
        raise FrameError(
            f"write reply {reply.data.hex(' ')} does not echo the request {request[1:5].hex(' ')}"
        )


def char_time_s(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Seconds one character takes on the line: start bit + data + parity + stop bits."""
    bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
    return bits / baudrate


def inter_frame_gap_s(
    baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1
) -> float:
    """The RTU inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 baud
    (Modbus over Serial Line v1.02, section 2.5.1.1)."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time_s(baudrate, bytesize, parity, stopbits)
