"""Benchmark-sized machines for ``appliance simulate --profile bench-N``.

A ``bench-N`` machine is a plain pymodbus server (unit id 1) with ``N`` contiguous uint16
holding registers at addresses 0..N-1, every one holding :data:`BENCH_VALUE`, and nothing else:
no physics, no tick task, no fault registers. It costs the simulator's process as little as a
Modbus server can, so that a benchmark measures the poller, not the cell (``bench-50`` is the
cell of ``appliance bench hotpath`` and ``benchmarks/acquisition.py``; the register names are
the client's business: ``drivers/profiles/bench-50.toml`` calls them ``r00``..``r49``, the
hotpath scenario names the first eight after the model's channels).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: What every register of a bench machine holds.
BENCH_VALUE = 7
#: The most registers one FC 3 request reads (Modbus), hence the largest ``bench-N``.
MAX_BENCH_REGISTERS = 125

_BENCH = re.compile(r"bench-([0-9]+)\Z")


def bench_registers(profile: str) -> int | None:
    """The register count of a ``bench-N`` profile name (``N`` in 1..125); None for any other
    name, ``ValueError`` for ``bench-N`` with ``N`` out of range."""
    m = _BENCH.match(profile)
    if m is None:
        return None
    n = int(m.group(1))
    if not 1 <= n <= MAX_BENCH_REGISTERS:
        raise ValueError(
            f"profile {profile!r}: a bench machine has 1..{MAX_BENCH_REGISTERS} registers"
        )
    return n


class BenchCell:
    """``machines`` bench machines of ``registers`` holding registers each, one Modbus TCP
    server per machine on ``ports`` (0: an ephemeral port, see :attr:`ports` after start)."""

    def __init__(self, ports: Sequence[int], registers: int, host: str = "127.0.0.1") -> None:
        if not ports:
            raise ValueError("a bench cell needs at least one machine")
        if not 1 <= registers <= MAX_BENCH_REGISTERS:
            raise ValueError(f"registers must be in 1..{MAX_BENCH_REGISTERS}, got {registers}")
        self.host = host
        self.ports: list[int] = [int(p) for p in ports]
        self.registers = registers
        self._servers: list[Any] = []

    @property
    def tick_task(self) -> asyncio.Task[None] | None:
        """Always None: bench machines have no model to tick."""
        return None

    def describe(self) -> str:
        return f"{len(self.ports)} bench machines, {self.registers} holding registers each"

    async def start(self) -> None:
        """Bind every machine's port (``OSError`` when one is taken; none is left open then)."""
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        try:
            for i, port in enumerate(self.ports):
                dev = SimDevice(
                    1,
                    simdata=(
                        [SimData(0, values=False, datatype=DataType.BITS)],
                        [SimData(0, values=False, datatype=DataType.BITS)],
                        [
                            SimData(
                                0,
                                count=self.registers,
                                values=BENCH_VALUE,
                                datatype=DataType.REGISTERS,
                            )
                        ],
                        [SimData(0, values=0, datatype=DataType.REGISTERS)],
                    ),
                )
                server: Any = ModbusTcpServer(dev, address=(self.host, port))
                try:
                    await server.serve_forever(background=True)
                except RuntimeError:
                    await server.shutdown()
                    raise OSError(
                        f"cnc-{i + 1}: cannot listen on {self.host}:{port} "
                        "(address in use or not available)"
                    ) from None
                self._servers.append(server)
                self.ports[i] = server.transport.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close every server; idempotent."""
        servers, self._servers = self._servers, []
        for server in servers:
            await server.shutdown()
        if servers:
            logger.info("bench cell stopped (%d machines)", len(servers))
