"""The command-line serving loop shared by the text-protocol simulators (Haas, line stream)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from drivers.errors import DeviceUnavailable

log = logging.getLogger(__name__)


class TextSimulator(Protocol):
    async def serve_tcp(self, host: str = ..., port: int = ...) -> int: ...

    async def serve_serial(self, url: str, baudrate: int = ...) -> None: ...

    async def stop(self) -> None: ...


def serve_until_interrupted(
    sim: TextSimulator,
    *,
    name: str,
    host: str,
    port: int,
    serial: str,
    start: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve on TCP ``host:port`` (unless port is 0) and on ``serial`` (unless empty) until
    Ctrl-C; exit code 0, or 1 when a port cannot be opened (logged, naming the simulator)."""

    async def serve() -> None:
        try:
            if port:
                await sim.serve_tcp(host, port)
            if serial:
                await sim.serve_serial(serial)
            if start is not None:
                await start()
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return 0
    except (OSError, DeviceUnavailable) as err:
        log.error("%s: %s", name, err)
        return 1
    return 0
