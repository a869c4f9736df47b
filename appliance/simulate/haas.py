"""A simulated Haas control answering machine-data-collection Q commands from a CncMachine.

:class:`HaasResponder` is pure (command text → framed reply bytes, no I/O, no clock);
:class:`HaasSimulator` serves it on TCP (like the control's port 5051) and on a serial port or
pty (one end of a ``socat`` pair, opened with pyserial through
:class:`drivers.text.transport.SerialTransport`). Simulated time advances by the wall time
between commands times ``time_scale``.

Commands (with or without the leading ``?``, any case, CR and/or LF terminated): ``Q100``
serial number, ``Q101`` software version, ``Q102`` model, ``Q104`` mode, ``Q500`` program /
status / parts (``STATUS, BUSY`` while the machine cuts or changes tools, ``PROGRAM, O01000,
IDLE|ALARM ON, PARTS, n`` otherwise), ``Q600 <var>`` for the variables of :data:`VARIABLES`.
Anything else is answered ``?``. Framing switches: ``stx_etb`` wraps each reply in STX…ETB,
``prompt`` sends ``>`` after it, ``three_field_macro`` answers ``MACRO, <var>, <value>`` rather
than ``MACRO, <value>``; ``garbage_every = N`` replaces every N-th reply with line noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from appliance.simulate.machine import CncMachine, ProgramState
from appliance.simulate.textserve import serve_until_interrupted
from drivers.errors import DeviceUnavailable
from drivers.text.framing import LineFramer
from drivers.text.transport import SerialSettings, SerialTransport

logger = logging.getLogger(__name__)

#: Q600 variables the simulator serves → the machine channel (or axis position) behind each.
#: 3027 spindle speed, 5021-5023 machine positions X/Y/Z (mm, a synthetic tool path), 3901 parts
#: counted; 100-106 are user macro variables a part program could fill with sensor readings.
VARIABLES: dict[int, str] = {
    3027: "spindle_speed",
    5021: "position_x",
    5022: "position_y",
    5023: "position_z",
    3901: "part_counter",
    100: "spindle_load",
    101: "spindle_temp",
    102: "coolant_temp",
    103: "vibration_rms",
    104: "axis_load_x",
    105: "axis_load_y",
    106: "axis_load_z",
}
#: What a garbage reply looks like on the wire (line noise, then a line end).
GARBAGE = b"\xff\x13#@!~%\xfe\r\n"
#: Longest simulated step (s) the model takes at once; longer gaps are split.
MAX_STEP_S = 0.25


def positions(machine: CncMachine) -> tuple[float, float, float]:
    """Synthetic machine positions X/Y/Z (mm): a Lissajous path while running, home otherwise."""
    if machine.program_state is not ProgramState.RUNNING:
        return 0.0, 0.0, 0.0
    t = machine.time_s
    return (
        round(200.0 * math.sin(0.3 * t), 4),
        round(150.0 * math.cos(0.2 * t), 4),
        round(-50.0 + 20.0 * math.sin(0.5 * t), 4),
    )


class HaasResponder:
    """Answers Q commands from ``machine``'s current values. Pure: no I/O, no clock."""

    def __init__(
        self,
        machine: CncMachine,
        *,
        stx_etb: bool = True,
        prompt: bool = True,
        three_field_macro: bool = True,
        garbage_every: int = 0,
        serial_number: str | None = None,
    ) -> None:
        if garbage_every < 0:
            raise ValueError(f"garbage_every must be >= 0, got {garbage_every}")
        self.machine = machine
        self.stx_etb = stx_etb
        self.prompt = prompt
        self.three_field_macro = three_field_macro
        self.garbage_every = garbage_every
        self.serial_number = serial_number or f"{1100000 + 1000 * machine.index + 7}"
        self.replies = 0

    def answer(self, command: str) -> str:
        """The reply text (no framing) for one command line."""
        cmd = command.strip().lstrip("?").strip().upper()
        head, _, arg = cmd.partition(" ")
        m = self.machine
        if head == "Q100":
            return f"SERIAL NUMBER, {self.serial_number}"
        if head == "Q101":
            return "SOFTWARE VERSION, 100.21.000.1100"
        if head == "Q102":
            return "MODEL, VF2SIM"
        if head == "Q104":
            return "MODE, MEM"
        values = m.values()
        if head == "Q500":
            state = m.program_state
            program = m.programs[0].number  # the simulated part program's number
            if state in (ProgramState.RUNNING, ProgramState.TOOL_CHANGE):
                return "STATUS, BUSY"
            status = "ALARM ON" if state is ProgramState.ALARM else "IDLE"
            return f"PROGRAM, O{program:05d}, {status}, PARTS, {int(values['part_counter'])}"
        if head == "Q600":
            try:
                var = int(arg.strip())
            except ValueError:
                return "?"
            channel = VARIABLES.get(var)
            if channel is None:
                return "?"
            x, y, z = positions(m)
            value = {"position_x": x, "position_y": y, "position_z": z}.get(channel)
            if value is None:
                value = values[channel]
            if self.three_field_macro:
                return f"MACRO, {var}, {value:.6f}"
            return f"MACRO, {value:.6f}"
        return "?"

    def respond(self, command: str) -> bytes:
        """The framed reply bytes for one command line (or garbage, every N-th reply)."""
        self.replies += 1
        if self.garbage_every and self.replies % self.garbage_every == 0:
            return GARBAGE
        text = self.answer(command).encode("ascii")
        if self.stx_etb:
            text = b"\x02" + text + b"\x17"
        return text + b"\r\n" + (b">" if self.prompt else b"")


class HaasSimulator:
    """Serves a :class:`HaasResponder` on TCP and/or a serial port until :meth:`stop`.

    ``time_scale``: simulated seconds per wall second. ``monotonic``: a seam for tests.
    Construction does no I/O; :meth:`stop` is idempotent.
    """

    def __init__(
        self,
        responder: HaasResponder,
        *,
        time_scale: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.responder = responder
        self.time_scale = time_scale
        self._monotonic = monotonic
        self._last_t: float | None = None
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.commands = 0

    def _advance(self) -> None:
        now = self._monotonic()
        if self._last_t is not None:
            dt = min(60.0, (now - self._last_t) * self.time_scale)
            while dt > 0:
                step = min(dt, MAX_STEP_S)
                self.responder.machine.step(step)
                dt -= step
        self._last_t = now

    async def _session(
        self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]
    ) -> None:
        framer = LineFramer(b"\r\n")
        while True:
            data = await read()
            for line in framer.feed(data):
                text = line.decode("ascii", errors="replace").strip()
                if not text:
                    continue
                self.commands += 1
                self._advance()
                await write(self.responder.respond(text))

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port."""

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def read() -> bytes:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionResetError("client closed")
                return data

            async def write(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            self._writers.add(writer)
            try:
                await self._session(read, write)
            except OSError:
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(client, host, port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        logger.info("haas simulator listening on %s:%d", host, bound)
        return bound

    async def serve_serial(self, url: str, baudrate: int = 9600) -> None:
        """Answer on serial port / pty ``url`` in a background task."""
        port = SerialTransport(SerialSettings(url, baudrate=baudrate))
        await port.open()

        async def run() -> None:
            try:
                await self._session(lambda: port.read_some(1.0), port.write)
            except DeviceUnavailable as err:
                logger.info("haas simulator on %s stopped: %s", url, err)
            finally:
                await port.close()

        task = asyncio.create_task(run(), name=f"haas sim {url}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop listening and close every session. Idempotent."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for writer in list(self._writers):  # end sessions in progress
            writer.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.simulate.haas``: serve one simulated Haas control until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m appliance.simulate.haas",
        description="Answer Haas Q commands from a simulated CNC machine (docs/drivers-text.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="TCP address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5051, help="TCP port, 0: none (default 5051)")
    parser.add_argument("--serial", default="", help="also answer on this serial port / pty")
    parser.add_argument("--seed", type=int, default=42, help="machine seed (default: 42)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="simulated s per wall s")
    parser.add_argument("--no-stx-etb", action="store_true", help="no STX/ETB around replies")
    parser.add_argument("--no-prompt", action="store_true", help="no '>' prompt after replies")
    parser.add_argument("--two-field-macro", action="store_true", help="MACRO, <value> replies")
    parser.add_argument("--garbage-every", type=int, default=0, help="garbage every N-th reply")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        responder = HaasResponder(
            CncMachine(args.seed),
            stx_etb=not args.no_stx_etb,
            prompt=not args.no_prompt,
            three_field_macro=not args.two_field_macro,
            garbage_every=args.garbage_every,
        )
    except ValueError as err:
        parser.error(str(err))
    sim = HaasSimulator(responder, time_scale=args.time_scale)

    return serve_until_interrupted(
        sim, name="haas simulator", host=args.host, port=args.port, serial=args.serial
    )


if __name__ == "__main__":
    raise SystemExit(main())
