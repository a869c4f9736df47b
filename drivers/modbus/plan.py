"""Read planning and block decoding: a register map → the fewest Modbus reads → float64 values.

Pure functions and plain data, no I/O; the device layer (``drivers.modbus.tcp``) sends the
planned requests and hands the raw answers back to :class:`Decoder`.

Planning (:func:`plan_reads`) merges the registers of one table into as few reads as the protocol
allows: one read function returns at most 125 registers (FC 3/4) or 2000 bits (FC 1/2)
(Modbus Application Protocol v1.1b3, sections 6.1-6.4). Registers may be merged across a gap of
up to ``max_gap`` unused addresses: fewer round trips, at the price of reading addresses the map
does not name. The default ``max_gap=0`` merges only adjacent or overlapping registers, because
many devices answer a read that touches an undefined address with exception 2 (illegal data
address) and that would turn every value of the merged read BAD. For fixed layouts the greedy
plan (extend the current read while the next register fits) is minimal.

Decoding (:class:`Decoder`) is columnar: the answers of all requests are copied into one uint16
buffer and each group of registers sharing a value type and byte order is decoded with one numpy
gather and ``view`` (word order is in the gather's positions, so the four orders of a type make
at most two groups: with and without the byte swap; one request's answer is used in place), so
the per-poll cost grows with the number of requests and groups, not with the number of values.
It agrees with :func:`drivers.modbus.codec.decode` value for value (table tests pin that).

Plans whose registers are all plain 16-bit words (``uint16``/``int16`` of the register tables,
without byte swap) take a shorter path: the answer is used in place (one request) or copied
into one buffer, gathered only when the registers are not laid out in request order, and
converted to float64 in one step; ``scale``/``offset`` is one expression over the whole poll
and is left out when every register has neither. For ``bench-50`` (50 ``uint16``, one request)
that is 2.3-4.8 against 7.1-12.2 µs per poll on a loaded 2-core VM (issue 11; docs/benchmarks.md,
"Saturation"). It returns what the general path returns, bit for bit (a test compares them on
the same answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.modbus.codec import CodecError
from drivers.modbus.registers import Register, Table
from drivers.quality import BAD, GOOD
from drivers.units import conversion

#: Most registers one read holding/input registers request may return (FC 3/4).
MAX_REGISTERS = 125
#: Most bits one read coils/discrete inputs request may return (FC 1/2).
MAX_BITS = 2000

#: Modbus read function code of each table; also the order in which plans list tables.
FUNCTION_CODE: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
BIT_TABLES = frozenset({"coil", "discrete"})

#: Big-endian numpy dtype of each multi-byte value type, after words are in ABCD order.
_DTYPE: dict[str, str] = {
    "int16": ">i2",
    "uint16": ">u2",
    "int32": ">i4",
    "uint32": ">u4",
    "int64": ">i8",
    "uint64": ">u8",
    "float32": ">f4",
    "float64": ">f8",
}

U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]
#: One read's raw answer: words (16-bit, as ints or a numpy array straight off the reply) or bits.
Block = Sequence[int] | Sequence[bool] | npt.NDArray[np.uint16]


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: ``count`` registers (or bits) of ``table`` from ``address`` (0-based).

    ``items`` lists the registers this read serves as ``(register_index, offset)``: the value of
    ``registers[register_index]`` starts ``offset`` words (bits) into the answer.
    """

    table: Table
    address: int
    count: int
    items: tuple[tuple[int, int], ...]

    @property
    def function_code(self) -> int:
        """The Modbus read function code for this request's table (1, 2, 3 or 4)."""
        return FUNCTION_CODE[self.table]


def plan_reads(
    registers: Sequence[Register],
    max_gap: int = 0,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
) -> tuple[ReadRequest, ...]:
    """Merge ``registers`` into the fewest reads, per table, within the protocol limits.

    ``max_gap`` is the most unused addresses (registers, or bits in coil/discrete tables) one read
    may span between two wanted ones. ``max_registers``/``max_bits`` cap one read's size (lower
    them for devices with smaller buffers). Requests come ordered by function code, then address.
    Raises ``ValueError`` for a negative gap, a limit outside the protocol's range, or a single
    value larger than one read.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if not 1 <= max_registers <= MAX_REGISTERS:
        raise ValueError(f"max_registers must be in 1..{MAX_REGISTERS}, got {max_registers}")
    if not 1 <= max_bits <= MAX_BITS:
        raise ValueError(f"max_bits must be in 1..{MAX_BITS}, got {max_bits}")
    by_table: dict[Table, list[int]] = {}
    for i, reg in enumerate(registers):
        by_table.setdefault(reg.table, []).append(i)
    plan: list[ReadRequest] = []
    for table in sorted(by_table, key=FUNCTION_CODE.__getitem__):
        limit = max_bits if table in BIT_TABLES else max_registers
        order = sorted(by_table[table], key=lambda i: (registers[i].address, i))
        start = end = -1
        members: list[int] = []
        for i in order:
            reg = registers[i]
            if reg.count > limit:
                raise ValueError(
                    f"register {reg.name!r} ({reg.count} registers) does not fit one read "
                    f"of at most {limit}"
                )
            reg_end = reg.address + reg.count
            if members and reg.address - end <= max_gap and max(end, reg_end) - start <= limit:
                end = max(end, reg_end)
                members.append(i)
                continue
            if members:
                plan.append(_request(table, start, end, members, registers))
            start, end, members = reg.address, reg_end, [i]
        plan.append(_request(table, start, end, members, registers))
    return tuple(plan)


def _request(
    table: Table, start: int, end: int, members: list[int], registers: Sequence[Register]
) -> ReadRequest:
    items = tuple((i, registers[i].address - start) for i in members)
    return ReadRequest(table=table, address=start, count=end - start, items=items)


@dataclass(frozen=True, slots=True)
class _Group:
    """Registers decoded by one vectorised step: same kind, same byte order."""

    kind: str  # a numpy dtype string from _DTYPE, or "bit" / "bool"
    out: npt.NDArray[np.intp]  # positions in the result (register indices)
    words: npt.NDArray[np.intp]  # (n, words per value) buffer positions, in ABCD word order
    swap: bool  # swap the two bytes of every word (orders BADC, DCBA)
    shift: npt.NDArray[np.uint16]  # bit index per register (kind "bit"), else zeros


class Decoder:
    """Turns the raw answers of a plan's requests into engineering values, columnar.

    Built once per device from its register list and the plan; :meth:`decode` then runs once
    per poll. Not thread-safe only in the sense that it keeps no state: it is safe to share.
    """

    def __init__(
        self,
        registers: Sequence[Register],
        requests: Sequence[ReadRequest],
        *,
        fast_path: bool = True,
    ) -> None:
        """Precompute buffer positions. Raises ``CodecError`` for string registers (they have no
        numeric value) and ``ValueError`` if ``requests`` do not serve every register once.

        ``fast_path=False`` decodes plain 16-bit maps the general way too (for tests that
        compare the two paths; the results are the same)."""
        self.registers = tuple(registers)
        self.requests = tuple(requests)
        n = len(self.registers)
        served = np.zeros(n, dtype=np.int64)
        bases: list[int] = []
        total = 0
        for req in self.requests:
            bases.append(total)
            total += req.count
        self._bases = tuple(bases)
        self._size = total
        conv = [conversion(r.convert) for r in self.registers]  # affine: folds into scale
        self._scale = np.array(
            [r.scale * a for r, (a, _) in zip(self.registers, conv, strict=True)], dtype=np.float64
        )
        self._offset = np.array(
            [r.offset * a + b for r, (a, b) in zip(self.registers, conv, strict=True)],
            dtype=np.float64,
        )
        groups: dict[tuple[str, bool], list[tuple[int, list[int], int]]] = {}
        members: list[npt.NDArray[np.intp]] = []
        for req, base in zip(self.requests, self._bases, strict=True):
            idx: list[int] = []
            for reg_index, offset in req.items:
                if not 0 <= reg_index < n:
                    raise ValueError(
                        f"request at {req.address} serves unknown register #{reg_index}"
                    )
                reg = self.registers[reg_index]
                if reg.table != req.table or offset < 0 or offset + reg.count > req.count:
                    raise ValueError(
                        f"register {reg.name!r} does not lie inside the "
                        f"{req.table} read {req.address}+{req.count}"
                    )
                served[reg_index] += 1
                idx.append(reg_index)
                kind, swap, reverse = _kind(reg)
                width = reg.count if kind not in ("bit", "bool") else 1
                positions = [base + offset + k for k in range(width)]
                if reverse:
                    positions.reverse()
                shift = reg.bit if kind == "bit" else 0
                groups.setdefault((kind, swap), []).append((reg_index, positions, shift))
            members.append(np.array(idx, dtype=np.intp))
        missing = [self.registers[i].name for i in np.flatnonzero(served != 1)]
        if missing:
            raise ValueError(f"requests must serve every register exactly once: {missing}")
        self._members = tuple(members)
        self._groups = tuple(
            _Group(
                kind=kind,
                out=np.array([e[0] for e in entries], dtype=np.intp),
                words=np.array([e[1] for e in entries], dtype=np.intp).reshape(len(entries), -1),
                swap=swap,
                shift=np.array([e[2] for e in entries], dtype=np.uint16),
            )
            for (kind, swap), entries in groups.items()
        )
        #: No register has a scale or an offset (conversions included): values are the raw ones.
        self._identity = bool((self._scale == 1.0).all() and (self._offset == 0.0).all())
        #: Plain 16-bit plans: every register one word, int16 or uint16, no byte swap.
        self._plain = fast_path and all(
            g.kind in (">u2", ">i2") and not g.swap for g in self._groups
        )
        word_at = np.empty(n, dtype=np.intp)
        is_signed = np.zeros(n, dtype=bool)
        for g in self._groups:
            word_at[g.out] = g.words[:, 0]
            is_signed[g.out] = g.kind == ">i2"
        #: Buffer position of each register (plain plans); None where it is the register index.
        self._word_at: npt.NDArray[np.intp] | None = (
            None if np.array_equal(word_at, np.arange(n)) and total == n else word_at
        )
        #: int16 registers of a plain plan that mixes int16 and uint16 (else None).
        self._signed: npt.NDArray[np.bool_] | None = is_signed if 0 < is_signed.sum() < n else None
        self._all_signed = n > 0 and bool(is_signed.all())

    @property
    def plain(self) -> bool:
        """True when :meth:`decode` takes the plain 16-bit path (see the module docstring)."""
        return self._plain

    def decode(self, blocks: Sequence[Block | None]) -> tuple[F64, U8]:
        """Decode one poll's answers, one per request in plan order; ``None`` = request failed.

        A block longer than its request (bit reads come padded to whole bytes) is cut to the
        request's count. Returns ``(values, quality)`` aligned with the register list: values are
        ``raw * scale + offset`` as float64 (bools and bits as 0.0/1.0); the values of a failed
        request are NaN with quality BAD. Raises ``ValueError`` if ``blocks`` does not match the
        plan, or a block is shorter than its request (the caller decides whether that is BAD).
        """
        if len(blocks) != len(self.requests):
            raise ValueError(f"expected {len(self.requests)} blocks, got {len(blocks)}")
        if self._plain:
            return self._decode_plain(blocks)
        failed: list[int] = []
        buf = self._words(blocks, failed)
        raw = np.empty(len(self.registers), dtype=np.float64)
        for g in self._groups:
            words = buf[g.words]
            if g.kind == "bit":
                raw[g.out] = (words[:, 0] >> g.shift) & 1
            elif g.kind == "bool":
                raw[g.out] = words[:, 0] != 0
            else:
                if g.swap:
                    words = words.byteswap()
                raw[g.out] = words.view(g.kind)[:, 0]
        values = raw * self._scale + self._offset
        quality = np.full(len(self.registers), GOOD, dtype=np.uint8)
        for i in failed:
            values[self._members[i]] = np.nan
            quality[self._members[i]] = BAD
        return values, quality

    def _words(self, blocks: Sequence[Block | None], failed: list[int]) -> npt.NDArray[Any]:
        """The answers as one big-endian word buffer, in plan order (a failed request's words
        0, its index appended to ``failed``): one request's answer is used as it is (no copy
        off the native client). Raises ``ValueError`` for a short block."""
        answers = zip(self.requests, self._bases, blocks, strict=True)
        if len(blocks) == 1 and blocks[0] is not None:
            words: npt.NDArray[Any] | None = None
        else:
            words = np.zeros(self._size, dtype=">u2")
        for i, (req, base, block) in enumerate(answers):
            if block is None:
                failed.append(i)
                continue
            if len(block) < req.count:
                raise ValueError(
                    f"{req.table} read {req.address}+{req.count} answered only {len(block)} values"
                )
            if words is None:
                return np.asarray(block[: req.count], dtype=">u2")
            words[base : base + req.count] = block[: req.count]
        assert words is not None
        return words

    def _decode_plain(self, blocks: Sequence[Block | None]) -> tuple[F64, U8]:
        """:meth:`decode` of a plan of plain 16-bit registers (see the module docstring)."""
        failed: list[int] = []
        words = self._words(blocks, failed)
        if self._word_at is not None:
            words = words[self._word_at]
        raw: npt.NDArray[Any]
        if self._all_signed:
            raw = words.view(">i2")
        elif self._signed is not None:
            raw = np.where(self._signed, words.view(">i2"), words)
        else:
            raw = words
        values = raw.astype(np.float64) if self._identity else raw * self._scale + self._offset
        quality = np.zeros(len(self.registers), dtype=np.uint8)  # GOOD
        for i in failed:
            values[self._members[i]] = np.nan
            quality[self._members[i]] = BAD
        return values, quality

    def served_by(self, request_index: int) -> npt.NDArray[np.intp]:
        """Register indices whose values come from ``requests[request_index]``."""
        return self._members[request_index]


def _kind(reg: Register) -> tuple[str, bool, bool]:
    """(decode kind, swap bytes within words, reverse word order) of one register."""
    if reg.table in BIT_TABLES or reg.type == "bool":
        return "bool", False, False
    if reg.type == "bit":
        return "bit", False, False  # codec.decode reads the bit off the word as sent
    if reg.type == "string":
        raise CodecError(f"register {reg.name!r}: strings have no numeric value to decode")
    wide = reg.count > 1
    return _DTYPE[reg.type], reg.order in ("BADC", "DCBA"), wide and reg.order in ("CDAB", "DCBA")


def decode_blocks(
    registers: Sequence[Register],
    requests: Sequence[ReadRequest],
    blocks: Sequence[Block | None],
) -> tuple[F64, U8]:
    """One-shot :meth:`Decoder.decode` (builds the decoder each call; hot paths keep one)."""
    return Decoder(registers, requests).decode(blocks)
