"""HaasDevice against the Haas simulator over real socat pty pairs and real TCP sockets, and
against scripted TCP peers (plain asyncio servers in the test) for timeouts and stale replies."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from texthelp import socat_pair

from appliance.simulate.haas import HaasResponder, HaasSimulator, positions
from appliance.simulate.machine import CncMachine
from drivers.errors import DeviceUnavailable
from drivers.quality import BAD, GOOD, STALE
from drivers.text.haas import HaasDevice, HaasVariable
from drivers.text.transport import SerialSettings, SerialTransport, TcpTransport, Transport

VARIABLES = [
    HaasVariable("spindle_speed", 3027),
    HaasVariable("parts_counted", 3901),
    HaasVariable("spindle_temp", 101, scale=2.0, offset=1.0),
]
CHANNELS = ("spindle_speed", "parts_counted", "spindle_temp", "parts_count", "running")


def frozen_clock() -> Callable[[], float]:
    """A monotonic clock that never advances: the simulated machine stands still, so the values
    the driver reads can be compared with the model's exactly."""
    return lambda: 0.0


async def start_sim(
    machine: CncMachine, tmp_serial: str | None = None, **framing: object
) -> tuple[HaasSimulator, int]:
    sim = HaasSimulator(HaasResponder(machine, **framing), monotonic=frozen_clock())  # type: ignore[arg-type]
    if tmp_serial is not None:
        await sim.serve_serial(tmp_serial)
    port = await sim.serve_tcp()
    return sim, port


def expected_values(machine: CncMachine) -> list[float]:
    v = machine.values()
    return [v["spindle_speed"], v["part_counter"], v["spindle_temp"] * 2.0 + 1.0]


def assert_close(got: float, want: float) -> None:
    assert math.isclose(got, want, rel_tol=0, abs_tol=1e-5), (got, want)


@pytest.mark.pty
@pytest.mark.parametrize("link", ["pty", "tcp", "socket-url"])
def test_haas_device_reads_variables_parts_and_running_over_pty_tcp_and_socket_urls(
    tmp_path: Path, link: str
) -> None:
    machine = CncMachine(seed=5)
    machine.step(0.1)

    async def main(a: str, b: str) -> None:
        sim, port = await start_sim(machine, a)
        transport: Transport
        if link == "pty":
            transport = SerialTransport(SerialSettings(b, baudrate=115200))
        elif link == "socket-url":  # pyserial's URL handler, as for a terminal server
            transport = SerialTransport(SerialSettings(f"socket://127.0.0.1:{port}"))
        else:
            transport = TcpTransport("127.0.0.1", port)
        dev = HaasDevice(transport, VARIABLES, timeout_s=2.0, name="vf2")
        assert dev.channels == CHANNELS
        try:
            await dev.connect()
            result = await dev.read()
        finally:
            await dev.close()
            await dev.close()  # idempotent
            await sim.stop()
        assert result.exceptions == ()
        assert list(result.quality) == [GOOD] * 5
        for got, want in zip(result.values[:3], expected_values(machine), strict=True):
            assert_close(got, want)
        assert result.values[3] == machine.values()["part_counter"]  # idle: Q500 has parts
        assert result.values[4] == 0.0
        assert dev.identity["serial_number"] == HaasResponder(machine).serial_number
        assert dev.identity["mode"] == "MEM"
        assert dev.identity["status"] == "IDLE"
        assert dev.identity["program"].startswith("O")

    with socat_pair(tmp_path) as (a, b):
        asyncio.run(main(a, b))


@pytest.mark.parametrize(
    ("stx_etb", "prompt", "three_field_macro"),
    [(True, True, True), (False, False, False), (True, False, False), (False, True, True)],
)
def test_every_framing_variant_reads_the_same_values(
    stx_etb: bool, prompt: bool, three_field_macro: bool
) -> None:
    machine = CncMachine(seed=9)

    async def main() -> np.ndarray:
        sim, port = await start_sim(
            machine, stx_etb=stx_etb, prompt=prompt, three_field_macro=three_field_macro
        )
        dev = HaasDevice(TcpTransport("127.0.0.1", port), VARIABLES, timeout_s=2.0)
        try:
            await dev.connect()
            result = await dev.read()
            assert list(result.quality) == [GOOD] * 5
            return result.values
        finally:
            await dev.close()
            await sim.stop()

    values = asyncio.run(main())
    for got, want in zip(values[:3], expected_values(machine), strict=True):
        assert_close(got, want)


def test_while_busy_parts_repeat_stale_and_running_is_one() -> None:
    machine = CncMachine(seed=1)
    while machine.values()["program_state"] != 0.0:
        machine.step(0.25)

    async def main() -> None:
        sim, port = await start_sim(machine)
        dev = HaasDevice(TcpTransport("127.0.0.1", port), [], timeout_s=2.0)
        try:
            await dev.connect()
            idle = await dev.read()
            while machine.values()["program_state"] != 1.0:
                machine.step(0.25)
            busy = await dev.read()
        finally:
            await dev.close()
            await sim.stop()
        assert list(idle.quality) == [GOOD, GOOD]
        assert idle.values[1] == 0.0
        assert list(busy.quality) == [STALE, GOOD]
        assert busy.values[0] == idle.values[0]
        assert busy.values[1] == 1.0
        assert dev.identity["status"] == "BUSY"

    asyncio.run(main())


def test_refused_and_garbage_replies_make_only_their_item_bad() -> None:
    machine = CncMachine(seed=2)
    variables = [*VARIABLES, HaasVariable("nope", 424242)]

    async def main() -> None:
        # replies: Q100, Q104, Q500, 3027, 3901 (garbage: the 5th), 101, 424242 (refused)
        sim, port = await start_sim(machine, garbage_every=5)
        dev = HaasDevice(TcpTransport("127.0.0.1", port), variables, timeout_s=2.0)
        try:
            await dev.connect()
            result = await dev.read()
        finally:
            await dev.close()
            await sim.stop()
        assert list(result.quality) == [GOOD, BAD, GOOD, BAD, GOOD, GOOD]
        assert math.isnan(result.values[1]) and math.isnan(result.values[3])
        assert [e.address for e in result.exceptions] == [3901, 424242]
        assert "424242" in str(result.exceptions[1])
        assert dev.stats()["garbage"] == 1
        assert dev.stats()["refused"] == 1

    asyncio.run(main())


async def scripted_peer(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def test_a_silent_device_times_out_as_unavailable_and_the_link_is_closed() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # Q100
            writer.write(b"SERIAL NUMBER, 42\r\n")
            await reader.read()  # then silence until the client hangs up
            writer.close()

        server, port = await scripted_peer(handler)
        dev = HaasDevice(TcpTransport("127.0.0.1", port), [HaasVariable("s", 3027)], timeout_s=0.2)
        try:
            await dev.connect()
            assert dev.identity == {"serial_number": "42"}
            with pytest.raises(DeviceUnavailable, match=r"no reply to Q104 within 0.2 s"):
                await dev.read()
        finally:
            await dev.close()
            server.close()

    asyncio.run(main())


def test_stale_replies_for_other_queries_are_skipped_and_counted() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readline() == b"?Q100\r\n"
            writer.write(b"SERIAL NUMBER, 7\r\n")
            assert await reader.readline() == b"?Q500\r\n"
            # a late answer to another client's query first, then the real one
            writer.write(b"MODE, MDI\r\nPROGRAM, O00001, IDLE, PARTS, 9\r\n")
            assert await reader.readline() == b"?Q600 3027\r\n"
            writer.write(b"MACRO, 5021, 1.0\r\n\x02MACRO, 3027, 800.5\x17\r\n>")
            await reader.read()
            writer.close()

        server, port = await scripted_peer(handler)
        dev = HaasDevice(
            TcpTransport("127.0.0.1", port),
            [HaasVariable("s", 3027)],
            timeout_s=1.0,
            query_mode=False,
        )
        try:
            await dev.connect()
            result = await dev.read()
        finally:
            await dev.close()
            server.close()
        assert list(result.values) == [800.5, 9.0, 0.0]
        assert dev.stats()["stale_replies"] == 2

    asyncio.run(main())


def test_connect_to_nothing_raises_unavailable_naming_the_port(tmp_path: Path) -> None:
    async def main() -> None:
        dev = HaasDevice(
            SerialTransport(SerialSettings(str(tmp_path / "no-such-tty"))), [], timeout_s=0.2
        )
        with pytest.raises(DeviceUnavailable, match="no-such-tty"):
            await dev.connect()
        await dev.close()

    asyncio.run(main())


def test_simulated_positions_are_home_unless_running() -> None:
    machine = CncMachine(seed=4)
    while machine.values()["program_state"] == 1.0:
        machine.step(0.25)
    assert positions(machine) == (0.0, 0.0, 0.0)


def test_an_unanswered_first_q100_is_asked_again_on_the_same_connection() -> None:
    connections: list[int] = []

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            assert await reader.readline() == b"?Q100\r\n"  # ignored, as a control may
            assert await reader.readline() == b"?Q100\r\n"
            writer.write(b"\x02SERIAL NUMBER, 5\x17\r\n>")
            await reader.read()
            writer.close()

        server, port = await scripted_peer(handler)
        dev = HaasDevice(TcpTransport("127.0.0.1", port), [HaasVariable("s", 1)], timeout_s=0.2)
        try:
            await dev.connect()
        finally:
            await dev.close()
            server.close()
        assert dev.identity == {"serial_number": "5"}

    asyncio.run(main())
    assert connections == [1]
