"""LineDevice against the line-stream simulator over real socat pty pairs and TCP, and against
scripted TCP peers (asyncio servers in the test) where the exact lines matter."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import subprocess
from pathlib import Path

import pytest
from texthelp import socat_pair, socat_process, wait_until

from appliance.simulate.machine import CncMachine
from appliance.simulate.textstream import LineStreamer, StreamSimulator
from drivers.errors import DeviceUnavailable
from drivers.quality import BAD, GOOD, STALE
from drivers.text.line import LineChannelMap, LineDevice, LineFormat
from drivers.text.transport import SerialSettings, SerialTransport, TcpTransport, Transport

LOG = "drivers.text.line"


@pytest.mark.pty
@pytest.mark.parametrize(("link", "fmt"), [("pty", "csv"), ("tcp", "kv"), ("pty", "kv")])
def test_line_device_follows_a_streaming_sensor_over_pty_and_tcp(
    tmp_path: Path, link: str, fmt: str
) -> None:
    channels = ("spindle_temp", "vibration_rms")

    async def main(a: str, b: str) -> None:
        machine = CncMachine(seed=3)
        streamer = LineStreamer(machine, fmt=fmt, channels=channels)  # type: ignore[arg-type]
        sim = StreamSimulator(streamer, rate_hz=200.0)
        await sim.serve_serial(a, baudrate=115200)
        port = await sim.serve_tcp()
        transport: Transport = (
            SerialTransport(SerialSettings(b, baudrate=115200))
            if link == "pty"
            else TcpTransport("127.0.0.1", port)
        )
        line_fmt = LineFormat("csv", columns=channels) if fmt == "csv" else LineFormat("kv")
        maps = [LineChannelMap("temp_f", "spindle_temp", 1.8, 32.0)]
        maps.append(LineChannelMap("vib", "vibration_rms"))
        dev = LineDevice(transport, line_fmt, maps, name="probe")
        try:
            await dev.connect()
            await sim.start()
            await wait_until(lambda: dev.lines >= 5)
            result = await dev.read()
            sent = machine.values()
        finally:
            await dev.close()
            await dev.close()
            await sim.stop()
        assert list(result.quality) == [GOOD, GOOD]
        # the simulator may have sent one more line since: compare with a tolerance
        assert math.isclose(result.values[0], sent["spindle_temp"] * 1.8 + 32.0, abs_tol=0.5)
        assert 0.0 < result.values[1] < 20.0
        assert dev.malformed == 0

    with socat_pair(tmp_path) as (a, b):
        asyncio.run(main(a, b))


async def line_peer(payload: list[bytes]) -> tuple[asyncio.Server, int, asyncio.Event]:
    """A TCP peer that sends ``payload`` chunks, one per ``go`` event set, then stays open."""
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in payload:
            await go.wait()
            go.clear()
            writer.write(chunk)
            await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), go


def test_values_are_good_when_fresh_stale_when_repeated_and_bad_when_never_seen(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        chunks = [
            b"temp=20 vib=0.1\r\ntemp=21 vib=0.2\ntemp=22",  # 2 lines + half of one
            b" vib=0.3\nnot a pair\n#comment\ntemp=x\n",  # completes it; 2 malformed
            b"vib=0.4\n",
        ]
        server, port, go = await line_peer(chunks)
        maps = [LineChannelMap(n, n) for n in ("temp", "vib", "rpm")]
        dev = LineDevice(TcpTransport("127.0.0.1", port), LineFormat("kv"), maps)
        try:
            await dev.connect()
            first = await dev.read()
            go.set()
            await wait_until(lambda: dev.lines == 2)
            second = await dev.read()
            go.set()
            await wait_until(lambda: dev.lines == 6)
            third = await dev.read()
            go.set()
            await wait_until(lambda: dev.lines == 7)
            fourth = await dev.read()
        finally:
            await dev.close()
            server.close()
        assert list(first.quality) == [BAD, BAD, BAD]
        assert list(second.values[:2]) == [21.0, 0.2]
        assert list(second.quality) == [GOOD, GOOD, BAD]
        assert math.isnan(second.values[2])
        assert list(third.values[:2]) == [22.0, 0.3]
        assert list(third.quality) == [GOOD, GOOD, BAD]
        assert list(fourth.values[:2]) == [22.0, 0.4]
        assert list(fourth.quality) == [STALE, GOOD, BAD]
        assert dev.stats() == {"lines": 7, "malformed": 2, "merged": 2, "overflows": 0}

    with caplog.at_level(logging.DEBUG, logger=LOG):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # two malformed lines in a row: logged once
    assert "malformed" in warnings[0].getMessage()
    assert any("parse again" in r.getMessage() for r in caplog.records)


def test_a_closed_stream_surfaces_as_unavailable_on_the_next_read() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"1,2\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        dev = LineDevice(
            TcpTransport("127.0.0.1", port),
            LineFormat("csv", columns=("a", "b")),
            [LineChannelMap("a", "a")],
        )
        try:
            await dev.connect()
            await wait_until(lambda: dev._failure is not None)
            with pytest.raises(DeviceUnavailable, match="closed by the device"):
                await dev.read()
            assert dev.lines == 1
        finally:
            await dev.close()
            server.close()

    asyncio.run(main())


def test_a_silent_stream_surfaces_as_unavailable_after_the_silence_timeout() -> None:
    now = [0.0]

    async def main() -> None:
        server, port, go = await line_peer([b"5\n"])
        dev = LineDevice(
            TcpTransport("127.0.0.1", port),
            LineFormat("csv", columns=("a",)),
            [LineChannelMap("a", "a")],
            silence_timeout_s=10.0,
            monotonic=lambda: now[0],
        )
        try:
            await dev.connect()
            go.set()
            await wait_until(lambda: dev.lines == 1)
            now[0] = 9.0
            assert list((await dev.read()).quality) == [GOOD]
            now[0] = 10.5
            with pytest.raises(DeviceUnavailable, match="no complete line for 10 s"):
                await dev.read()
        finally:
            await dev.close()
            server.close()

    asyncio.run(main())


def test_overlong_and_undecodable_lines_are_counted_not_fatal() -> None:
    async def main() -> None:
        server, port, go = await line_peer([b"x" * 100 + b"\n\xff\xfe\n7\n"])
        dev = LineDevice(
            TcpTransport("127.0.0.1", port),
            LineFormat("csv", columns=("a",)),
            [LineChannelMap("a", "a")],
            max_line_bytes=32,
        )
        try:
            await dev.connect()
            go.set()
            await wait_until(lambda: dev.lines == 2)
            result = await dev.read()
        finally:
            await dev.close()
            server.close()
        assert list(result.values) == [7.0]
        assert dev.stats() == {"lines": 2, "malformed": 1, "merged": 0, "overflows": 1}

    asyncio.run(main())


def test_construction_rejects_unusable_channel_maps() -> None:
    transport = TcpTransport("127.0.0.1", 1)
    with pytest.raises(ValueError, match="no channels"):
        LineDevice(transport, LineFormat("kv"), [])
    with pytest.raises(ValueError, match="duplicate"):
        LineDevice(transport, LineFormat("kv"), [LineChannelMap("a", "a")] * 2)
    with pytest.raises(ValueError, match="not columns"):
        LineDevice(transport, LineFormat("csv", columns=("a",)), [LineChannelMap("b", "b")])


@pytest.mark.pty
def test_a_vanished_pty_peer_surfaces_as_unavailable_naming_the_port(tmp_path: Path) -> None:
    async def main(b: str, proc: subprocess.Popen[bytes]) -> None:
        dev = LineDevice(
            SerialTransport(SerialSettings(b)),
            LineFormat("csv", columns=("a",)),
            [LineChannelMap("a", "a")],
        )
        try:
            await dev.connect()
            proc.terminate()
            await wait_until(lambda: dev._failure is not None)
            with pytest.raises(DeviceUnavailable, match=re.escape(b)):
                await dev.read()
        finally:
            await dev.close()

    with socat_process(tmp_path) as (_a, b, proc):
        asyncio.run(main(b, proc))
