"""A simulated streaming sensor: text lines (CSV or ``key=value``) from a CncMachine.

:class:`LineStreamer` is pure (the machine's current values → one formatted line);
:class:`StreamSimulator` steps the machine at ``rate_hz`` (simulated ``time_scale / rate_hz`` s
per line) and writes each line to every TCP client and to a serial port / pty (one end of a
``socat`` pair). ``garbage_every = N`` replaces every N-th line with line noise, to exercise the
driver's malformed-line handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Literal

from appliance.simulate.machine import CHANNELS, CncMachine
from appliance.simulate.textserve import serve_until_interrupted
from drivers.errors import DeviceUnavailable
from drivers.text.transport import SerialSettings, SerialTransport

logger = logging.getLogger(__name__)

#: A line of noise (not valid in either format), as :data:`StreamSimulator` injects it.
GARBAGE_LINE = b"\xfe#@!~%garbage\r\n"


class LineStreamer:
    """Formats the machine's values as one line. Pure: no I/O, no clock.

    ``csv``: the values of ``channels`` in order, joined by ``separator``; ``kv``:
    ``name=value`` pairs joined by ``pair_separator``. Values get ``decimals`` decimals; lines
    end with ``line_end``.
    """

    def __init__(
        self,
        machine: CncMachine,
        *,
        fmt: Literal["csv", "kv"] = "csv",
        channels: Sequence[str] = CHANNELS,
        separator: str = ",",
        pair_separator: str = " ",
        kv_separator: str = "=",
        decimals: int = 4,
        line_end: str = "\r\n",
        garbage_every: int = 0,
    ) -> None:
        unknown = [c for c in channels if c not in CHANNELS]
        if unknown:
            raise ValueError(f"channels {unknown} are not machine channels ({CHANNELS})")
        if garbage_every < 0:
            raise ValueError(f"garbage_every must be >= 0, got {garbage_every}")
        self.machine = machine
        self.fmt = fmt
        self.channels = tuple(channels)
        self.separator = separator
        self.pair_separator = pair_separator
        self.kv_separator = kv_separator
        self.decimals = decimals
        self.line_end = line_end
        self.garbage_every = garbage_every
        self.count = 0

    def line(self) -> bytes:
        """The next line for the current values (or noise, every ``garbage_every``-th line)."""
        self.count += 1
        if self.garbage_every and self.count % self.garbage_every == 0:
            return GARBAGE_LINE
        v = self.machine.values()
        d = self.decimals
        if self.fmt == "csv":
            text = self.separator.join(f"{v[c]:.{d}f}" for c in self.channels)
        else:
            text = self.pair_separator.join(
                f"{c}{self.kv_separator}{v[c]:.{d}f}" for c in self.channels
            )
        return (text + self.line_end).encode("ascii")


class StreamSimulator:
    """Streams a :class:`LineStreamer` at ``rate_hz`` to TCP clients and serial ports.

    Construction does no I/O; :meth:`start` starts the tick task; :meth:`stop` is idempotent.
    Overload policy: a TCP client that cannot keep up (more than 64 KiB unsent) is disconnected.
    """

    def __init__(
        self, streamer: LineStreamer, *, rate_hz: float = 20.0, time_scale: float = 1.0
    ) -> None:
        if not rate_hz > 0 or not time_scale > 0:
            raise ValueError("rate_hz and time_scale must be > 0")
        self.streamer = streamer
        self.rate_hz = rate_hz
        self.time_scale = time_scale
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._ports: list[SerialTransport] = []
        self._task: asyncio.Task[None] | None = None
        self.lines = 0

    async def start(self) -> None:
        """Start streaming (to whoever is connected)."""
        if self._task is None:
            self._task = asyncio.create_task(self._tick(), name="line stream sim")

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Accept TCP clients on ``host:port`` (0: a free port); returns the bound port."""

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            with contextlib.suppress(OSError):
                await reader.read()  # until the client goes away
            self._writers.discard(writer)
            writer.close()

        server = await asyncio.start_server(client, host, port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        logger.info("line stream simulator listening on %s:%d", host, bound)
        return bound

    async def serve_serial(self, url: str, baudrate: int = 9600) -> None:
        """Stream to serial port / pty ``url`` too."""
        port = SerialTransport(SerialSettings(url, baudrate=baudrate))
        await port.open()
        self._ports.append(port)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate_hz
        next_t = loop.time()
        while True:
            next_t += period
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            self.streamer.machine.step(period * self.time_scale)
            line = self.streamer.line()
            self.lines += 1
            for writer in list(self._writers):
                if writer.transport.get_write_buffer_size() > 65536:
                    self._writers.discard(writer)
                    writer.close()
                    continue
                writer.write(line)
            for port in list(self._ports):
                try:
                    await port.write(line)
                except DeviceUnavailable as err:
                    logger.info("line stream simulator: %s", err)
                    self._ports.remove(port)

    async def stop(self) -> None:
        """Stop streaming, close clients and ports. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        ports, self._ports = self._ports, []
        for port in ports:
            await port.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.simulate.textstream``: stream sensor lines until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m appliance.simulate.textstream",
        description="Stream CSV or key=value lines of a simulated CNC machine.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="TCP address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=4001, help="TCP port, 0: none (default 4001)")
    parser.add_argument("--serial", default="", help="also stream to this serial port / pty")
    parser.add_argument("--format", choices=("csv", "kv"), default="csv")
    parser.add_argument("--channels", default=",".join(CHANNELS), help="comma-separated channels")
    parser.add_argument("--rate-hz", type=float, default=20.0, help="lines per second")
    parser.add_argument("--seed", type=int, default=42, help="machine seed (default: 42)")
    parser.add_argument("--garbage-every", type=int, default=0, help="noise every N-th line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        streamer = LineStreamer(
            CncMachine(args.seed),
            fmt=args.format,
            channels=[c for c in args.channels.split(",") if c],
            garbage_every=args.garbage_every,
        )
        sim = StreamSimulator(streamer, rate_hz=args.rate_hz)
    except ValueError as err:
        parser.error(str(err))

    return serve_until_interrupted(
        sim,
        name="line stream simulator",
        host=args.host,
        port=args.port,
        serial=args.serial,
        start=sim.start,
    )


if __name__ == "__main__":
    raise SystemExit(main())
