"""Pure layers of the text protocols, table-tested: framing, Haas replies, line formats, and
the simulators' pure formatters."""

from __future__ import annotations

import math

import pytest

from appliance.simulate.haas import GARBAGE, HaasResponder
from appliance.simulate.machine import CncMachine
from appliance.simulate.textstream import GARBAGE_LINE, LineStreamer
from drivers.text.framing import LineFramer
from drivers.text.haas import (
    HAAS_DELIMITERS,
    Q500Status,
    ReplyError,
    decode_q500,
    decode_q600,
    parse_reply,
    q600_matches,
)
from drivers.text.line import LineError, LineFormat

FRAMER_CASES = [
    # (chunks, delimiters, expected lines)
    ([b"a\r\nb\n"], b"\r\n", [b"a", b"b"]),
    ([b"a\r", b"\nb\r\n"], b"\r\n", [b"a", b"b"]),
    ([b"par", b"tial", b"\n"], b"\r\n", [b"partial"]),
    ([b"\r\n\r\n\n"], b"\r\n", []),
    ([b"no end"], b"\r\n", []),
    # a trailing prompt stays buffered and prefixes the next reply (parse_reply strips it)
    ([b"\x02SERIAL NUMBER, 1\x17\r\n>"], HAAS_DELIMITERS, [b"SERIAL NUMBER, 1"]),
    ([b"\x02MACRO, 1.5\x17", b"\r\n"], HAAS_DELIMITERS, [b"MACRO, 1.5"]),
    ([b">\x02MODE, MEM\x17\r\n"], HAAS_DELIMITERS, [b">", b"MODE, MEM"]),
    ([b"\x02STATUS,", b" BUSY\x17"], HAAS_DELIMITERS, [b"STATUS, BUSY"]),
    ([b"a\x00b\n"], b"\r\n", [b"a\x00b"]),
]


@pytest.mark.parametrize(("chunks", "delimiters", "expected"), FRAMER_CASES)
def test_framer_splits_lines_across_any_read_boundaries(
    chunks: list[bytes], delimiters: bytes, expected: list[bytes]
) -> None:
    framer = LineFramer(delimiters)
    got = [line for chunk in chunks for line in framer.feed(chunk)]
    assert got == expected
    # byte by byte gives the same lines: framing never depends on read sizes
    framer = LineFramer(delimiters)
    data = b"".join(chunks)
    assert [line for i in range(len(data)) for line in framer.feed(data[i : i + 1])] == expected


def test_framer_discards_overlong_lines_and_resyncs_at_the_next_delimiter() -> None:
    framer = LineFramer(b"\n", max_line_bytes=8)
    assert framer.feed(b"0123456789") == []
    assert framer.pending == 0
    assert framer.feed(b"abc\nok\n") == [b"ok"]
    assert framer.feed(b"0123456789abc\nfine\n") == [b"fine"]
    assert framer.overflows == 2


def test_framer_clear_drops_the_partial_line() -> None:
    framer = LineFramer()
    framer.feed(b"half")
    assert framer.clear() == b"half"
    assert framer.feed(b"line\n") == [b"line"]


REPLY_CASES = [
    # (line, key, fields, refused, known)
    ("SERIAL NUMBER, 1234567", "SERIAL NUMBER", ("SERIAL NUMBER", "1234567"), False, True),
    (">SERIAL NUMBER,1234567 ", "SERIAL NUMBER", ("SERIAL NUMBER", "1234567"), False, True),
    ("MACRO, 3027, 1200.0000", "MACRO", ("MACRO", "3027", "1200.0000"), False, True),
    ("macro, 12.5", "MACRO", ("macro", "12.5"), False, True),
    (
        "PROGRAM, O00123, IDLE, PARTS, 45",
        "PROGRAM",
        ("PROGRAM", "O00123", "IDLE", "PARTS", "45"),
        False,
        True,
    ),
    ("STATUS, BUSY", "STATUS", ("STATUS", "BUSY"), False, True),
    ("?", "?", ("?",), True, False),
    ("?Q600", "?Q600", ("?Q600",), True, False),
    ("INVALID NUMBER", "INVALID NUMBER", ("INVALID NUMBER",), True, False),
    ("UNKNOWN COMMAND", "UNKNOWN COMMAND", ("UNKNOWN COMMAND",), True, False),
    ("\ufffd#@!", "\ufffd#@!", ("\ufffd#@!",), False, False),
    (">", "", (), False, False),
    ("  ", "", (), False, False),
]


@pytest.mark.parametrize(("line", "key", "fields", "refused", "known"), REPLY_CASES)
def test_parse_reply_splits_fields_and_classifies_the_reply(
    line: str, key: str, fields: tuple[str, ...], refused: bool, known: bool
) -> None:
    reply = parse_reply(line)
    assert reply.key == key
    assert reply.fields == fields
    assert reply.refused is refused
    assert reply.known is known
    assert reply.empty is (not fields)


Q500_CASES = [
    ("PROGRAM, O00123, IDLE, PARTS, 45", Q500Status("O00123", "IDLE", 45.0), 0.0),
    ("PROGRAM, MDI, ALARM ON, PARTS, 0", Q500Status("MDI", "ALARM ON", 0.0), 0.0),
    ("PROGRAM, O1, FEED HOLD, PARTS, 3", Q500Status("O1", "FEED HOLD", 3.0), 0.0),
    ("STATUS, BUSY", Q500Status(None, "BUSY", None), 1.0),
    ("PROGRAM, O00123, RUNNING", Q500Status("O00123", "RUNNING", None), 1.0),
    ("PROGRAM, O00123, DANCING, PARTS, 1", Q500Status("O00123", "DANCING", 1.0), None),
]


@pytest.mark.parametrize(("line", "status", "running"), Q500_CASES)
def test_q500_replies_decode_program_status_parts_and_running(
    line: str, status: Q500Status, running: float | None
) -> None:
    got = decode_q500(parse_reply(line))
    assert got == status
    assert got.running == running


@pytest.mark.parametrize(
    "line",
    [
        "PROGRAM, O00123, IDLE, PARTS, many",
        "PROGRAM, O00123, IDLE, PIECES, 4",
        "PROGRAM",
        "STATUS",
        "MACRO, 1.0",
        "PROGRAM, O1, IDLE, PARTS, nan",
    ],
)
def test_malformed_q500_replies_raise_reply_error(line: str) -> None:
    with pytest.raises(ReplyError):
        decode_q500(parse_reply(line))


Q600_CASES = [
    ("MACRO, 1200.0000", 3027, 1200.0),
    ("MACRO, 3027, 1200.0000", 3027, 1200.0),
    ("MACRO,5021,-12.5", 5021, -12.5),
    ("MACRO, 3027.000000, 7", 3027, 7.0),
]


@pytest.mark.parametrize(("line", "var", "value"), Q600_CASES)
def test_q600_replies_decode_two_and_three_field_shapes(line: str, var: int, value: float) -> None:
    reply = parse_reply(line)
    assert q600_matches(reply, var)
    assert decode_q600(reply, var) == value


@pytest.mark.parametrize(
    "line",
    ["MACRO, 3027, x", "MACRO", "MACRO, 1, 2, 3", "MODE, MEM", "MACRO, inf", "MACRO, 5021, 1.0"],
)
def test_malformed_or_foreign_q600_replies_raise_reply_error(line: str) -> None:
    with pytest.raises(ReplyError):
        decode_q600(parse_reply(line), 3027)


def test_a_three_field_macro_reply_for_another_variable_does_not_match() -> None:
    assert not q600_matches(parse_reply("MACRO, 5021, 1.0"), 3027)
    assert q600_matches(parse_reply("MACRO, 1.0"), 3027)


CSV = LineFormat("csv", columns=("temp", "_", "vib"))
KV = LineFormat("kv")
KV_SEMI = LineFormat("kv", pair_separator=";", kv_separator=":")

LINE_CASES = [
    (CSV, "21.5,x,0.3", {"temp": 21.5, "vib": 0.3}),
    (CSV, " 21.5 , 1 , -3e-1 ", {"temp": 21.5, "vib": -0.3}),
    (KV, "temp=21.5 vib=0.3", {"temp": 21.5, "vib": 0.3}),
    (KV, "temp=21.5\tvib=0.3  rpm=1200", {"temp": 21.5, "vib": 0.3, "rpm": 1200.0}),
    (KV_SEMI, "temp:21.5;vib:0.3;", {"temp": 21.5, "vib": 0.3}),
]


@pytest.mark.parametrize(("fmt", "line", "expected"), LINE_CASES)
def test_line_formats_parse_fields_by_key(
    fmt: LineFormat, line: str, expected: dict[str, float]
) -> None:
    assert fmt.parse(line) == expected


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        (CSV, "21.5,0.3"),
        (CSV, "21.5,1,0.3,9"),
        (CSV, "21.5,1,abc"),
        (CSV, "temp,x,vib"),
        (CSV, "nan,1,2"),
        (KV, "temp=21.5 vib"),
        (KV, "temp=hot"),
        (KV, "=3"),
        (KV_SEMI, "temp=21.5"),
    ],
)
def test_malformed_lines_raise_line_error(fmt: LineFormat, line: str) -> None:
    with pytest.raises(LineError):
        fmt.parse(line)


def test_comment_and_blank_lines_are_recognised() -> None:
    assert CSV.is_comment("# header")
    assert CSV.is_comment("   ")
    assert not CSV.is_comment("1,2,3")
    assert not LineFormat("csv", columns=("a",), comment="").is_comment("#1")


@pytest.mark.parametrize(
    ("stx_etb", "prompt", "wire"),
    [
        (True, True, b"\x02MODE, MEM\x17\r\n>"),
        (True, False, b"\x02MODE, MEM\x17\r\n"),
        (False, True, b"MODE, MEM\r\n>"),
        (False, False, b"MODE, MEM\r\n"),
    ],
)
def test_haas_simulator_frames_replies_as_configured(
    stx_etb: bool, prompt: bool, wire: bytes
) -> None:
    responder = HaasResponder(CncMachine(1), stx_etb=stx_etb, prompt=prompt)
    assert responder.respond("?Q104") == wire


def test_haas_simulator_answers_from_the_machine_model() -> None:
    machine = CncMachine(3)
    responder = HaasResponder(machine, three_field_macro=False)
    values = machine.values()
    assert responder.answer("?Q100").startswith("SERIAL NUMBER, ")
    assert responder.answer("q600 3901") == f"MACRO, {values['part_counter']:.6f}"
    assert responder.answer("Q600 3027") == f"MACRO, {values['spindle_speed']:.6f}"
    assert responder.answer("Q600 77777") == "?"
    assert responder.answer("Q999") == "?"
    q500 = decode_q500(parse_reply(responder.answer("Q500")))
    assert q500.parts == values["part_counter"] or q500.status == "BUSY"


def test_haas_simulator_injects_garbage_every_nth_reply() -> None:
    responder = HaasResponder(CncMachine(1), garbage_every=3)
    wires = [responder.respond("Q104") for _ in range(6)]
    assert [w == GARBAGE for w in wires] == [False, False, True, False, False, True]


def test_line_streamer_formats_csv_and_key_value_lines_that_the_codec_parses() -> None:
    machine = CncMachine(2)
    values = machine.values()
    csv = LineStreamer(machine, channels=("spindle_temp", "vibration_rms"))
    kv = LineStreamer(machine, fmt="kv", channels=("spindle_temp", "vibration_rms"))
    got_csv = LineFormat("csv", columns=("t", "v")).parse(csv.line().decode().strip())
    got_kv = LineFormat("kv").parse(kv.line().decode().strip())
    assert math.isclose(got_csv["t"], values["spindle_temp"], abs_tol=1e-4)
    assert math.isclose(got_kv["vibration_rms"], values["vibration_rms"], abs_tol=1e-4)
    noisy = LineStreamer(machine, garbage_every=2)
    assert [noisy.line() == GARBAGE_LINE for _ in range(4)] == [False, True, False, True]
