"""Pure table tests of read planning and columnar decoding (drivers.modbus.plan)."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import pytest

from drivers.modbus import codec
from drivers.modbus.plan import Decoder, ReadRequest, decode_blocks, plan_reads
from drivers.modbus.registers import Register, load_profile
from drivers.quality import BAD, GOOD


def reg(
    name: str, address: int, type_: str = "uint16", table: str = "holding", **kw: Any
) -> Register:
    return Register(name=name, address=address, type=type_, table=table, **kw)  # type: ignore[arg-type]


def spans(plan: tuple[ReadRequest, ...]) -> list[tuple[str, int, int]]:
    return [(r.table, r.address, r.count) for r in plan]


SCATTERED = [
    reg("a", 0),
    reg("b", 1),
    reg("c", 2, "float32"),  # 0..3
    reg("d", 10),
    reg("e", 11),  # 10..11 (gap of 6 after 3)
    reg("f", 100, "uint32"),  # 100..101
]


@pytest.mark.parametrize(
    ("registers", "max_gap", "expected"),
    [
        pytest.param([], 0, [], id="empty map, no reads"),
        pytest.param([reg("a", 7)], 0, [("holding", 7, 1)], id="one register"),
        pytest.param(
            SCATTERED,
            0,
            [("holding", 0, 4), ("holding", 10, 2), ("holding", 100, 2)],
            id="scattered map without gap filling: one read per run",
        ),
        pytest.param(
            SCATTERED,
            5,
            [("holding", 0, 4), ("holding", 10, 2), ("holding", 100, 2)],
            id="gap of 6 is not filled with max_gap 5",
        ),
        pytest.param(
            SCATTERED,
            6,
            [("holding", 0, 12), ("holding", 100, 2)],
            id="gap of 6 is filled with max_gap 6",
        ),
        pytest.param(SCATTERED, 88, [("holding", 0, 102)], id="everything within one read"),
        pytest.param(
            [reg("b", 5), reg("a", 3), reg("c", 4)],
            0,
            [("holding", 3, 3)],
            id="unsorted map is merged by address",
        ),
        pytest.param(
            [reg("w", 5), reg("bit3", 5, "bit", bit=3), reg("x", 5, "int16")],
            0,
            [("holding", 5, 1)],
            id="overlapping registers share one read",
        ),
        pytest.param(
            [reg("long", 0, "float64"), reg("in", 2)],
            0,
            [("holding", 0, 4)],
            id="register inside a longer one",
        ),
        pytest.param(
            [
                reg("h", 0),
                reg("i", 0, table="input"),
                reg("c", 0, "bool", table="coil"),
                reg("d", 0, "bool", table="discrete"),
                reg("h2", 1),
                reg("c2", 1, "bool", "coil"),
            ],
            0,
            [("coil", 0, 2), ("discrete", 0, 1), ("holding", 0, 2), ("input", 0, 1)],
            id="coils, discrete inputs and registers are separate reads, in function code order",
        ),
        pytest.param(
            load_profile("cnc-sim"),
            0,
            [("holding", 0, 3), ("input", 0, 11)],
            id="the cnc-sim profile is two reads",
        ),
    ],
)
def test_plan_merges_registers_into_the_fewest_reads(
    registers: list[Register], max_gap: int, expected: list[tuple[str, int, int]]
) -> None:
    assert spans(plan_reads(registers, max_gap=max_gap)) == expected


def test_a_200_register_run_becomes_two_reads_within_the_125_register_limit() -> None:
    registers = [reg(f"r{i}", i) for i in range(200)]
    assert spans(plan_reads(registers)) == [("holding", 0, 125), ("holding", 125, 75)]


def test_multi_register_values_are_never_split_across_reads() -> None:
    registers = [reg(f"f{i}", 2 * i, "float32") for i in range(100)]  # 200 registers
    plan = plan_reads(registers)
    assert spans(plan) == [("holding", 0, 124), ("holding", 124, 76)]
    assert all(off + 2 <= r.count for r in plan for _, off in r.items)


def test_coils_are_limited_to_2000_bits_per_read() -> None:
    registers = [reg(f"c{i}", i, "bool", "coil") for i in range(2500)]
    assert spans(plan_reads(registers)) == [("coil", 0, 2000), ("coil", 2000, 500)]


def test_smaller_limits_are_respected_for_devices_with_small_buffers() -> None:
    registers = [reg(f"r{i}", i) for i in range(10)]
    assert spans(plan_reads(registers, max_registers=4)) == [
        ("holding", 0, 4),
        ("holding", 4, 4),
        ("holding", 8, 2),
    ]
    bits = [reg(f"c{i}", i, "bool", "discrete") for i in range(5)]
    assert spans(plan_reads(bits, max_bits=2)) == [
        ("discrete", 0, 2),
        ("discrete", 2, 2),
        ("discrete", 4, 1),
    ]


def test_gap_filling_never_exceeds_the_read_limit() -> None:
    registers = [reg("a", 0), reg("b", 124), reg("c", 125)]
    assert spans(plan_reads(registers, max_gap=200)) == [("holding", 0, 125), ("holding", 125, 1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_gap": -1}, "max_gap", id="negative gap"),
        pytest.param({"max_registers": 126}, "max_registers", id="over the FC3 limit"),
        pytest.param({"max_registers": 0}, "max_registers", id="zero registers"),
        pytest.param({"max_bits": 2001}, "max_bits", id="over the FC1 limit"),
        pytest.param({"max_registers": 1}, "does not fit one read", id="value larger than a read"),
    ],
)
def test_plan_rejects_impossible_limits(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_reads([reg("f", 0, "float32")], **kwargs)


def test_random_maps_plan_into_valid_reads_that_serve_every_register_once() -> None:
    rng = random.Random(20240607)
    types = ["uint16", "int16", "float32", "uint32", "float64", "bit", "bool"]
    for _ in range(200):
        registers: list[Register] = []
        for i in range(rng.randint(1, 60)):
            table = rng.choice(["holding", "input", "coil", "discrete"])
            type_ = "bool" if table in ("coil", "discrete") else rng.choice(types)
            registers.append(reg(f"r{i}", rng.randint(0, 400), type_, table))
        max_gap = rng.choice([0, 1, 3, 10, 50])
        max_registers = rng.choice([4, 16, 125])
        plan = plan_reads(registers, max_gap=max_gap, max_registers=max_registers)
        served = sorted(i for r in plan for i, _ in r.items)
        assert served == list(range(len(registers)))
        for r in plan:
            limit = 2000 if r.table in ("coil", "discrete") else max_registers
            assert 1 <= r.count <= limit
            for i, off in r.items:
                assert registers[i].table == r.table
                assert registers[i].address == r.address + off
                assert off + registers[i].count <= r.count
        for a, b in pairwise(plan):  # same table: ordered, disjoint, and not mergeable
            if a.table == b.table:
                gap = b.address - (a.address + a.count)
                first_end = b.address + registers[b.items[0][0]].count
                assert gap >= 0
                assert gap > max_gap or first_end - a.address > max_registers
        Decoder(registers, plan)  # the decoder accepts every plan


def _expected(words: list[int], r: Register) -> float:
    value = codec.decode(words, r.type, r.order, bit=r.bit)
    assert not isinstance(value, str)
    return float(value) * r.scale + r.offset


SAMPLES: dict[str, list[float]] = {
    "int16": [-32768, -1, 0, 12345],
    "uint16": [0, 1, 65535],
    "int32": [-(2**31), -70000, 70000],
    "uint32": [0, 70000, 2**32 - 1],
    "int64": [-(2**53), -5, 2**40 + 3],
    "uint64": [0, 2**53, 2**63 + 2**20],
    "float32": [-1.5, 0.0, 21.5, 3.4e38],
    "float64": [-1e300, 2.5e-10, math.pi],
}


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize("type_", list(SAMPLES))
def test_decoder_agrees_with_the_codec_for_every_type_and_byte_order(
    type_: str, order: str
) -> None:
    registers: list[Register] = []
    words: list[int] = []
    for i, v in enumerate(SAMPLES[type_]):
        registers.append(reg(f"v{i}", len(words), type_, order=order, scale=0.5, offset=-2.0))
        words += codec.encode(v, type_, order)
    plan = plan_reads(registers)
    assert len(plan) == 1
    values, quality = Decoder(registers, plan).decode([words])
    expected = [_expected(words[r.address : r.address + r.count], r) for r in registers]
    assert values.dtype == np.float64
    assert values.tolist() == expected
    assert quality.tolist() == [GOOD] * len(registers)


def test_decoder_reads_bits_of_a_word_and_bools_of_registers_and_coils() -> None:
    registers = [reg(f"b{k}", 0, "bit", bit=k) for k in range(16)] + [
        reg("nonzero", 1, "bool"),
        reg("zero", 2, "bool"),
        reg("c0", 0, "bool", "coil"),
        reg("c9", 9, "bool", "coil"),
        reg("d3", 3, "bool", "discrete", scale=10.0),
    ]
    plan = plan_reads(registers, max_gap=10)
    word = 0b1000_0000_0010_0101
    coils = [True] + [False] * 8 + [True] + [False] * 6  # padded to whole bytes, like the wire
    blocks: dict[str, Sequence[int]] = {
        "holding": [word, 7, 0],
        "coil": coils,
        "discrete": [True] + [False] * 7,
    }
    values, quality = Decoder(registers, plan).decode([blocks[r.table] for r in plan])
    assert values[:16].tolist() == [float((word >> k) & 1) for k in range(16)]
    assert values[16:].tolist() == [1.0, 0.0, 1.0, 1.0, 10.0]
    assert (quality == GOOD).all()


def test_a_failed_request_makes_only_its_values_nan_and_bad() -> None:
    registers = [reg("h", 0, scale=2.0), reg("i", 0, "int16", "input"), reg("h2", 1)]
    plan = plan_reads(registers)
    assert spans(plan) == [("holding", 0, 2), ("input", 0, 1)]
    values, quality = decode_blocks(registers, plan, [[21, 22], None])
    assert values[0] == 42.0 and values[2] == 22.0 and math.isnan(values[1])
    assert quality.tolist() == [GOOD, BAD, GOOD]


def test_decoder_refuses_short_blocks_and_a_wrong_number_of_blocks() -> None:
    registers = [reg("f", 0, "float32")]
    decoder = Decoder(registers, plan_reads(registers))
    with pytest.raises(ValueError, match="answered only 1"):
        decoder.decode([[0x41AC]])
    with pytest.raises(ValueError, match="expected 1 blocks"):
        decoder.decode([])


def test_decoder_refuses_string_registers_and_plans_that_miss_a_register() -> None:
    with pytest.raises(codec.CodecError, match="strings"):
        Decoder([reg("s", 0, "string", length=4)], plan_reads([reg("s", 0, "string", length=4)]))
    registers = [reg("a", 0), reg("b", 5)]
    with pytest.raises(ValueError, match="exactly once"):
        Decoder(registers, plan_reads(registers[:1]))


def test_float32_decoding_matches_an_independent_struct_encoding() -> None:
    registers = [reg("t", 0, "float32"), reg("t_cdab", 2, "float32", order="CDAB")]
    hi, lo = struct.unpack(">HH", struct.pack(">f", 38.25))
    values, _ = decode_blocks(registers, plan_reads(registers), [[hi, lo, lo, hi]])
    assert values.tolist() == [38.25, 38.25]


def _plain_map(rng: random.Random, orders: Sequence[str]) -> list[Register]:
    """A random map of one-word registers, some scaled: in two tables, gaps and all, or (a
    third of them) contiguous in one table from address 0, like ``bench-50``."""
    scaled = rng.random() < 0.5
    contiguous = rng.random() < 0.33
    registers: list[Register] = []
    for i in range(rng.randint(1, 80)):
        registers.append(
            reg(
                f"r{i}",
                i if contiguous else rng.randint(0, 300),
                rng.choice(["uint16", "int16"]),
                "holding" if contiguous else rng.choice(["holding", "input"]),
                order=rng.choice(orders),
                scale=rng.choice([1.0, 0.1, -2.5]) if scaled else 1.0,
                offset=rng.choice([0.0, -40.0, 1e-3]) if scaled else 0.0,
            )
        )
    return registers


def test_plain_16_bit_maps_decode_on_the_fast_path_exactly_as_on_the_general_path() -> None:
    rng = random.Random(20261130)
    for case in range(300):
        # BADC/DCBA swap the bytes of a word: such maps are not plain and keep the general path.
        orders = ["ABCD", "CDAB"] if case % 4 else ["ABCD", "BADC", "DCBA"]
        registers = _plain_map(rng, orders)
        plan = plan_reads(
            registers, max_gap=rng.choice([0, 2, 20]), max_registers=rng.choice([8, 50, 125])
        )
        fast = Decoder(registers, plan)
        general = Decoder(registers, plan, fast_path=False)
        swapped = any(r.order in ("BADC", "DCBA") for r in registers)
        assert fast.plain is not swapped and not general.plain
        blocks: list[Any] = []
        for req in plan:
            words = [rng.randrange(0x10000) for _ in range(req.count + rng.choice([0, 0, 3]))]
            if rng.random() < 0.15:
                blocks.append(None)  # a refused request: its values BAD and NaN
            elif rng.random() < 0.5:  # as the native client hands them over, read-only
                blocks.append(np.frombuffer(struct.pack(f">{len(words)}H", *words), ">u2"))
            else:  # as pymodbus and the RTU driver hand them over
                blocks.append(words)
        values, quality = fast.decode(blocks)
        expected_values, expected_quality = general.decode(blocks)
        assert values.dtype == np.float64 and quality.dtype == np.uint8
        assert values.tobytes() == expected_values.tobytes()  # bit for bit, NaN included
        assert quality.tolist() == expected_quality.tolist()
        assert values.flags.writeable and quality.flags.writeable  # fresh, the caller's own


def test_the_plain_path_refuses_short_blocks_as_the_general_path_does() -> None:
    registers = [reg("a", 0), reg("b", 1, "int16"), reg("c", 10, table="input")]
    plan = plan_reads(registers)
    decoder = Decoder(registers, plan)
    assert decoder.plain
    with pytest.raises(ValueError, match="holding read 0\\+2 answered only 1 values"):
        decoder.decode([[1], [2]])
    one = Decoder(registers[:2], plan_reads(registers[:2]))
    with pytest.raises(ValueError, match="holding read 0\\+2 answered only 1 values"):
        one.decode([np.frombuffer(b"\x00\x01", ">u2")])


def test_bench_50_takes_the_plain_path_and_mixed_maps_the_general_one() -> None:
    bench = load_profile("bench-50")
    assert Decoder(bench, plan_reads(bench)).plain
    cnc = load_profile("cnc-sim")  # uint32 and float32 registers
    assert not Decoder(cnc, plan_reads(cnc)).plain


def test_random_mixed_maps_decode_as_the_codec_decodes_each_register() -> None:
    rng = random.Random(1130)
    types = ["uint16", "int16", "uint32", "int32", "float32", "float64", "int64", "bit", "bool"]
    for _ in range(150):
        registers: list[Register] = []
        words: dict[tuple[str, int], int] = {}
        expected: list[float] = []
        used: set[tuple[str, int]] = set()
        one_read = rng.random() < 0.4  # all in holding registers 0..103: one request
        for i in range(rng.randint(1, 40)):
            table = "holding" if one_read else rng.choice(["holding", "input", "coil"])
            type_ = "bool" if table == "coil" else rng.choice(types)
            order = rng.choice(["ABCD", "CDAB", "BADC", "DCBA"])
            width = {"uint32": 2, "int32": 2, "float32": 2, "float64": 4, "int64": 4}.get(type_, 1)
            address = rng.randint(0, 100 if one_read else 200)
            span = {(table, address + k) for k in range(width)}
            if span & used:
                continue  # one value per address here, so that the words are unambiguous
            used |= span
            scale, offset = rng.choice([(1.0, 0.0), (0.5, -3.0)])
            r = reg(f"r{i}", address, type_, table, order=order, scale=scale, offset=offset)
            if type_ == "bit":
                r = reg(f"r{i}", address, "bit", table, bit=rng.randrange(16))
            value = rng.choice(SAMPLES.get(type_, [0, 1]))
            encoded = codec.encode(value, type_, order, bit=r.bit)
            if type_ == "bit":
                encoded = [encoded[0] | (rng.randrange(0x10000) & ~(1 << r.bit))]
            for k, w in enumerate(encoded):
                words[(table, address + k)] = w
            registers.append(r)
            expected.append(_expected(encoded, r))
        plan = plan_reads(registers, max_gap=125 if one_read else rng.choice([0, 5, 50]))
        assert len(plan) == 1 or not one_read
        failed = {i for i in range(len(plan)) if rng.random() < 0.2}
        blocks: list[Any] = []
        for i, req in enumerate(plan):
            block = [words.get((req.table, req.address + k), 0) for k in range(req.count)]
            if req.table == "coil":
                block = [bool(w) for w in block]
            if i in failed:
                blocks.append(None)
            elif req.table != "coil" and rng.random() < 0.5:
                blocks.append(np.frombuffer(struct.pack(f">{len(block)}H", *block), ">u2"))
            else:
                blocks.append(block)
        values, quality = Decoder(registers, plan).decode(blocks)
        bad = {int(j) for i in failed for j in Decoder(registers, plan).served_by(i)}
        for j, r in enumerate(registers):
            if j in bad:
                assert math.isnan(values[j]) and quality[j] == BAD, r
            else:
                assert values[j] == expected[j] and quality[j] == GOOD, r
