"""The simulators as processes: ``python -m appliance.simulate.haas`` / ``.textstream`` serve
on TCP, a driver reads them, and SIGINT stops them with exit status 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import free_port, wait_port
from texthelp import wait_until

from drivers.quality import GOOD
from drivers.text.haas import HaasDevice, HaasVariable
from drivers.text.line import LineChannelMap, LineDevice, LineFormat
from drivers.text.transport import TcpTransport


@contextmanager
def simulator(module: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung simulator
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_the_haas_simulator_process_answers_q_commands_and_stops_on_sigint() -> None:
    port = free_port()
    with simulator("appliance.simulate.haas", "--port", str(port), "--no-stx-etb") as proc:
        wait_port(port, timeout_s=5.0)

        async def main() -> None:
            dev = HaasDevice(TcpTransport("127.0.0.1", port), [HaasVariable("s", 3027)])
            try:
                await dev.connect()
                result = await dev.read()
            finally:
                await dev.close()
            assert result.quality[0] == GOOD
            assert dev.identity["mode"] == "MEM"

        asyncio.run(main())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0


def test_the_line_stream_simulator_process_streams_key_value_lines() -> None:
    port = free_port()
    args = ("--port", str(port), "--format", "kv", "--channels", "coolant_temp", "--rate-hz", "50")
    with simulator("appliance.simulate.textstream", *args) as proc:
        wait_port(port, timeout_s=5.0)

        async def main() -> None:
            dev = LineDevice(
                TcpTransport("127.0.0.1", port),
                LineFormat("kv"),
                [LineChannelMap("coolant", "coolant_temp")],
            )
            try:
                await dev.connect()
                await wait_until(lambda: dev.lines >= 2)
                result = await dev.read()
            finally:
                await dev.close()
            assert result.quality[0] == GOOD
            assert 15.0 < result.values[0] < 35.0

        asyncio.run(main())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
