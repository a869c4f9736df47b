"""Registers ↔ typed values. Pure functions, no I/O.

Modbus registers are 16-bit words sent big-endian on the wire. Multi-register values are laid out
by the device in one of four orders, named after the bytes of a 32-bit value 0xAABBCCDD:

=======  ==========================================  =====================
order    what the device sends (registers in order)  also known as
=======  ==========================================  =====================
ABCD     AA BB | CC DD                               big endian
CDAB     CC DD | AA BB                               word swap ("little-endian words")
BADC     BB AA | DD CC                               byte swap
DCBA     DD CC | BB AA                               little endian
=======  ==========================================  =====================

The same rule extends to 64-bit values (ABCD: words in big-endian order; CDAB: words reversed;
BADC: bytes swapped within each word; DCBA: all bytes reversed). For 16-bit values only the
byte swap matters (BADC and DCBA swap, ABCD and CDAB do not).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal, get_args

ValueType = Literal[
    "bit",
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

VALUE_TYPES: tuple[str, ...] = get_args(ValueType)
BYTE_ORDERS: tuple[str, ...] = get_args(ByteOrder)

#: Registers a value of each fixed-size type occupies (``string`` is sized by its length).
REGISTER_COUNT: dict[str, int] = {
    "bit": 1,
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}

_STRUCT: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}


class CodecError(ValueError):
    """A value cannot be encoded or a register block cannot be decoded as asked."""


def register_count(value_type: str, length: int = 0) -> int:
    """Number of 16-bit registers a value occupies; ``length`` is in characters for strings."""
    if value_type == "string":
        if length <= 0:
            raise CodecError("string registers need a positive length (characters)")
        return (length + 1) // 2
    try:
        return REGISTER_COUNT[value_type]
    except KeyError:
        raise CodecError(f"unknown value type {value_type!r}") from None


def _to_canonical(regs: Sequence[int], order: str) -> bytes:
    """Device register order → big-endian bytes (ABCD)."""
    words = list(regs)
    if order in ("CDAB", "DCBA"):
        words.reverse()
    swap = order in ("BADC", "DCBA")
    out = bytearray()
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise CodecError(f"register value {w!r} is not a 16-bit word")
        hi, lo = w >> 8, w & 0xFF
        out += bytes((lo, hi)) if swap else bytes((hi, lo))
    return bytes(out)


def _from_canonical(raw: bytes, order: str) -> list[int]:
    """Big-endian bytes (ABCD) → registers in the device's order."""
    swap = order in ("BADC", "DCBA")
    words = [
        (raw[i + 1] << 8 | raw[i]) if swap else (raw[i] << 8 | raw[i + 1])
        for i in range(0, len(raw), 2)
    ]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    return words


def decode(
    regs: Sequence[int], value_type: str, order: str = "ABCD", *, bit: int = 0
) -> int | float | bool | str:
    """Decode the registers of one value. ``bit`` (0..15) selects a bit for type ``bit``."""
    if order not in BYTE_ORDERS:
        raise CodecError(f"unknown byte order {order!r}")
    if value_type == "string":
        raw = _to_canonical(regs, "BADC" if order in ("BADC", "DCBA") else "ABCD")
        return raw.split(b"\0", 1)[0].decode("latin-1").rstrip()
    n = register_count(value_type)
    if len(regs) != n:
        raise CodecError(f"{value_type} needs {n} registers, got {len(regs)}")
    if value_type == "bit":
        if not 0 <= bit <= 15:
            raise CodecError(f"bit index {bit} is outside 0..15")
        return bool((regs[0] >> bit) & 1)
    if value_type == "bool":
        return bool(regs[0])
    value: int | float = struct.unpack(_STRUCT[value_type], _to_canonical(regs, order))[0]
    return value


def encode(
    value: float | int | bool | str,
    value_type: str,
    order: str = "ABCD",
    *,
    length: int = 0,
    bit: int = 0,
) -> list[int]:
    """Encode one value into registers in the device's order (the inverse of :func:`decode`)."""
    if order not in BYTE_ORDERS:
        raise CodecError(f"unknown byte order {order!r}")
    if value_type == "string":
        n = register_count("string", length)
        raw = str(value).encode("latin-1")[: 2 * n].ljust(2 * n, b"\0")
        return _from_canonical(raw, "BADC" if order in ("BADC", "DCBA") else "ABCD")
    if value_type in ("bit", "bool"):
        return [(1 << bit) if (value_type == "bit" and value) else int(bool(value))]
    fmt = _STRUCT.get(value_type)
    if fmt is None:
        raise CodecError(f"unknown value type {value_type!r}")
    if fmt[-1] in "fd":
        raw = struct.pack(fmt, float(value))
    else:
        try:
            raw = struct.pack(fmt, int(round(float(value))))
        except struct.error as err:
            raise CodecError(f"{value!r} does not fit {value_type}: {err}") from None
    return _from_canonical(raw, order)
