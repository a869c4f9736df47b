"""Modbus RTU framing: build request ADUs, size and check reply ADUs. Pure functions, no I/O.

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

from dataclasses import dataclass

READ_FUNCTIONS = frozenset({1, 2, 3, 4})
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
#: Largest RTU ADU (bytes): 1 address + 253 PDU + 2 CRC.
MAX_ADU = 256


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


def read_request(unit: int, function_code: int, address: int, count: int) -> bytes:
    """The ADU of a read (FC 1-4): ``count`` bits (FC 1/2, ≤2000) or registers (FC 3/4, ≤125)."""
    _check_unit(unit)
    if function_code not in READ_FUNCTIONS:
        raise ValueError(f"function code {function_code} is not a read (1..4)")
    _check_span(address, count, 2000 if function_code in (1, 2) else 125)
    return with_crc(
        bytes((unit, function_code)) + address.to_bytes(2, "big") + count.to_bytes(2, "big")
    )


def write_single_register(unit: int, address: int, value: int) -> bytes:
    """The ADU of FC 6: one 16-bit register."""
    _check_unit(unit)
    _check_span(address, 1, 1)
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value {value} is not a 16-bit word")
    return with_crc(bytes((unit, 6)) + address.to_bytes(2, "big") + value.to_bytes(2, "big"))


def write_single_coil(unit: int, address: int, value: bool) -> bytes:
    """The ADU of FC 5: one coil (``FF 00`` on, ``00 00`` off)."""
    _check_unit(unit)
    _check_span(address, 1, 1)
    return with_crc(
        bytes((unit, 5)) + address.to_bytes(2, "big") + (b"\xff\x00" if value else b"\x00\x00")
    )


def write_multiple_registers(unit: int, address: int, values: list[int] | tuple[int, ...]) -> bytes:
    """The ADU of FC 16: 1..123 registers from ``address``."""
    _check_unit(unit)
    _check_span(address, len(values), 123)
    if any(not 0 <= v <= 0xFFFF for v in values):
        raise ValueError("register values must be 16-bit words")
    data = b"".join(v.to_bytes(2, "big") for v in values)
    head = bytes((unit, 16)) + address.to_bytes(2, "big") + len(values).to_bytes(2, "big")
    return with_crc(head + bytes((len(data),)) + data)


def write_multiple_coils(unit: int, address: int, values: list[bool] | tuple[bool, ...]) -> bytes:
    """The ADU of FC 15: 1..1968 coils from ``address``, packed LSB first."""
    _check_unit(unit)
    _check_span(address, len(values), 1968)
    packed = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            packed[i // 8] |= 1 << (i % 8)
    head = bytes((unit, 15)) + address.to_bytes(2, "big") + len(values).to_bytes(2, "big")
    return with_crc(head + bytes((len(packed),)) + bytes(packed))


def reply_length(head: bytes, function_code: int) -> int | None:
    """Total length in bytes of the reply that starts with ``head`` to a ``function_code`` request.

    Needs 2 bytes for an exception or a write echo, 3 for a read (the byte count); returns
    ``None`` while ``head`` is shorter. Raises :class:`FrameError` when the function code byte is
    neither the request's nor its exception form (garbage: the rest cannot be sized).
    """
    if len(head) < 2:
        return None
    fc = head[1]
    if fc == function_code | 0x80:
        return 5
    if fc != function_code:
        raise FrameError(f"reply has function code {fc:#04x}, expected {function_code:#04x}")
    if fc in WRITE_FUNCTIONS:
        return 8
    if fc in READ_FUNCTIONS:
        return None if len(head) < 3 else 3 + head[2] + 2
    raise FrameError(f"function code {fc} is not supported")


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
    if adu[1] & 0x80:
        return Reply(unit, function_code, adu[2], b"")
    if function_code in READ_FUNCTIONS:
        return Reply(unit, function_code, 0, adu[3:-2])
    return Reply(unit, function_code, 0, adu[2:-2])


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
    """A write reply echoes the request's address and quantity/value (bytes 2..5)."""
    if reply.data[:4] != request[2:6]:
        raise FrameError(
            f"write reply {reply.data.hex(' ')} does not echo the request {request[2:6].hex(' ')}"
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
