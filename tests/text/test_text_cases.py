"""Data-driven protocol cases: every folder in ``tests/text/cases/`` is one case.

``config.toml``: an appliance config with one ``haas_q`` or ``line`` device on TCP (its
``port`` is replaced by the scripted peer's). ``transcript.txt``: the conversation, one step per
line, replayed by a real TCP peer (an asyncio server in this test)::

    # comment
    > Q500          the driver must send this command (prefix ``?`` and CR LF stripped)
    < TEXT          the device sends TEXT + CR LF (Python escapes such as \\x02 allowed)
    << BYTES        the device sends exactly BYTES (escapes decoded; nothing appended)
    = read          the driver reads here (haas: the read's commands follow; line: after every
                    line above has arrived)

``expected.json``: the last read's ``values`` (null = NaN) and ``quality`` per channel, and
optionally ``identity`` (the whole dict), ``stats`` (a subset of the driver's counters) and
``exceptions`` (how many items the last read reported refused/garbled).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from texthelp import wait_until

from appliance.acquire import make_driver
from appliance.config import HaasConfig, LineConfig, load_config
from drivers.quality import BAD, GOOD, STALE
from drivers.text.framing import LineFramer
from drivers.text.haas import HaasDevice
from drivers.text.line import LineDevice

CASES = Path(__file__).resolve().parent / "cases"
QUALITY = {"GOOD": GOOD, "STALE": STALE, "BAD": BAD}


def unescape(text: str) -> bytes:
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


def parse_transcript(path: Path) -> list[tuple[str, Any]]:
    """Steps: ("send", command) / ("reply", bytes) / ("read", None)."""
    steps: list[tuple[str, Any]] = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.startswith("<<"):
            steps.append(("reply", unescape(raw[2:].removeprefix(" "))))
        elif raw.startswith("<"):
            steps.append(("reply", unescape(raw[1:].removeprefix(" ")) + b"\r\n"))
        elif raw.startswith(">"):
            steps.append(("send", raw[1:].strip()))
        elif raw.strip() == "= read":
            steps.append(("read", None))
        else:
            raise ValueError(f"{path}:{n}: cannot parse transcript line {raw!r}")
    return steps


async def run_haas(dev: HaasDevice, steps: list[tuple[str, Any]], server_errors: list[str]) -> Any:
    await dev.connect()
    result = None
    for _ in range(sum(1 for kind, _ in steps if kind == "read")):
        result = await dev.read()
    assert not server_errors, server_errors
    return result


async def run_line(
    dev: LineDevice, steps: list[tuple[str, Any]], read_done: asyncio.Event, max_line_bytes: int
) -> Any:
    """Read after each section has arrived; tell the peer (``read_done``) to send the next."""
    await dev.connect()
    sent = b""
    result = None
    sections: list[bytes] = [b""]
    for kind, arg in steps:
        if kind == "reply":
            sections[-1] += arg
        elif kind == "read":
            sections.append(b"")
    for section in sections[:-1]:
        sent += section
        framer = LineFramer(b"\r\n", max_line_bytes=max_line_bytes)
        expected_lines = len(framer.feed(sent))

        def arrived(n: int = expected_lines) -> bool:
            return dev.lines == n

        await wait_until(arrived)
        result = await dev.read()
        read_done.set()
    return result


def run_case(folder: Path) -> tuple[Any, Any]:
    steps = parse_transcript(folder / "transcript.txt")
    cfg = load_config(folder / "config.toml")
    (device,) = cfg.devices
    assert isinstance(device, HaasConfig | LineConfig)
    errors: list[str] = []
    received: list[str] = []

    async def main() -> tuple[Any, Any]:
        read_done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for kind, arg in steps:
                if kind == "send":
                    line = (await reader.readline()).decode("ascii").strip().removeprefix("?")
                    received.append(line)
                    if line != arg:
                        errors.append(f"driver sent {line!r}, transcript expects {arg!r}")
                elif kind == "reply":
                    writer.write(arg)
                    await writer.drain()
                elif isinstance(device, LineConfig):  # the next section after this read
                    await read_done.wait()
                    read_done.clear()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        dev = make_driver(msgspec.structs.replace(device, port=port))
        try:
            if isinstance(dev, HaasDevice):
                result = await run_haas(dev, steps, errors)
                sends = [arg for kind, arg in steps if kind == "send"]
                assert received == sends, "the driver did not send every command of the transcript"
                return result, dev
            assert isinstance(dev, LineDevice) and isinstance(device, LineConfig)
            return await run_line(dev, steps, read_done, device.max_line_bytes), dev
        finally:
            await dev.close()
            server.close()

    return asyncio.run(main())


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_protocol_case_gives_the_expected_channel_values(case: str) -> None:
    folder = CASES / case
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    result, dev = run_case(folder)
    got_values = dict(zip(dev.channels, result.values.tolist(), strict=True))
    got_quality = dict(zip(dev.channels, result.quality.tolist(), strict=True))
    assert set(got_values) == set(expected["values"])
    for name, want in expected["values"].items():
        if want is None:
            assert math.isnan(got_values[name]), (name, got_values[name])
        else:
            assert math.isclose(got_values[name], want, abs_tol=1e-9), (name, got_values[name])
    assert got_quality == {k: QUALITY[v] for k, v in expected["quality"].items()}
    if "identity" in expected:
        assert dev.identity == expected["identity"]
    stats = dev.stats()
    for key, want in expected.get("stats", {}).items():
        assert stats[key] == want, (key, stats)
    if "exceptions" in expected:
        assert len(result.exceptions) == expected["exceptions"]
