"""Byte transports for text protocols: a serial port (pyserial, incl. ``socket://`` URLs) or TCP.

Both implement :class:`Transport`: ``open()``, ``write(data)``, ``read_some(timeout_s)`` (some
bytes, or ``b""`` when nothing arrived within ``timeout_s``) and an idempotent ``close()``. A
failed link raises :class:`~drivers.errors.DeviceUnavailable` naming the port.

pyserial is blocking. :class:`SerialTransport` runs every pyserial call on one dedicated worker
thread per port (a single-thread executor), with the port's read timeout at
:data:`SERIAL_POLL_S`. Why a thread and not ``loop.add_reader`` on the fd: pyserial URL handlers
(``socket://``, ``rfc2217://``, ``loop://``) have no usable file descriptor, and one thread per
port keeps every pyserial call serialised, so ``close()`` can never race a read in progress: it
is queued behind it and waits at most :data:`SERIAL_POLL_S`. A cancelled ``read_some`` returns
control at once; the thread's read finishes within :data:`SERIAL_POLL_S` and its bytes are kept
for the next call, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import serial

from drivers.errors import DeviceUnavailable

#: Read timeout of the serial worker thread's blocking reads (s): the longest a cancelled read
#: or a ``close()`` waits for the thread.
SERIAL_POLL_S = 0.05
#: Most bytes one serial read returns.
SERIAL_READ_MAX = 4096
#: Most bytes one TCP read returns.
TCP_READ_BYTES = 4096

_T = TypeVar("_T")


def _retrieve(fut: asyncio.Future[bytes]) -> None:
    """Mark a worker read's outcome as seen, so one nobody awaits any more logs nothing."""
    if not fut.cancelled():
        fut.exception()


class Transport(Protocol):
    """A byte stream to one device. Used from one asyncio task at a time.

    ``read_some``/``write`` raise :class:`DeviceUnavailable` when the link fails (after which
    only ``close()`` is useful); ``close()`` is idempotent and never raises.
    """

    name: str

    async def open(self) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def read_some(self, timeout_s: float) -> bytes: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SerialSettings:
    """A serial port: ``url`` is a device path or a pyserial URL (``socket://host:port``).

    Line settings (baud, data bits, parity ``N/E/O/M/S``, stop bits 1/1.5/2, flow control) are
    ignored by URL handlers that have no line, such as ``socket://``.
    """

    url: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False


class SerialTransport:
    """A serial port (or pyserial URL) served by one worker thread. Construction does no I/O."""

    def __init__(self, settings: SerialSettings, *, write_timeout_s: float = 1.0) -> None:
        if not settings.url:
            raise ValueError("serial port: empty url")
        self.settings = settings
        self.name = settings.url
        self._write_timeout_s = write_timeout_s
        self._ser: serial.SerialBase | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: asyncio.Future[bytes] | None = None

    async def open(self) -> None:
        """Open the port. Raises :class:`DeviceUnavailable` when it cannot be opened."""
        await self.close()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"serial {self.name}"
        )
        try:
            self._ser = await self._call(self._open_blocking)
        except (serial.SerialException, OSError, ValueError) as err:
            await self.close()
            raise DeviceUnavailable(f"serial {self.name}: cannot open: {err}") from None

    def _open_blocking(self) -> serial.SerialBase:
        s = self.settings
        ser = serial.serial_for_url(s.url, do_not_open=True)
        ser.baudrate = s.baudrate
        ser.bytesize = s.bytesize
        ser.parity = s.parity
        ser.stopbits = s.stopbits
        ser.xonxoff = s.xonxoff
        ser.rtscts = s.rtscts
        ser.timeout = SERIAL_POLL_S
        ser.write_timeout = self._write_timeout_s
        ser.open()
        return ser

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._pool is None:
            raise DeviceUnavailable(f"serial {self.name}: not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` (bounded by the write timeout)."""
        ser = self._ser
        if ser is None:
            raise DeviceUnavailable(f"serial {self.name}: not open")
        try:
            await self._call(lambda: ser.write(data))
        except (serial.SerialException, OSError) as err:
            await self.close()
            raise DeviceUnavailable(f"serial {self.name}: write failed: {err}") from None

    def _read_blocking(self) -> bytes:
        ser = self._ser
        if ser is None:
            return b""
        data = bytearray(ser.read(max(1, ser.in_waiting)))
        # drain what else is waiting in this thread: pyserial's socket:// handler reports
        # in_waiting as 0/1, so one read per byte must not cost a round trip to the loop
        while data and len(data) < SERIAL_READ_MAX:
            waiting = ser.in_waiting
            if not waiting:
                break
            data += ser.read(min(waiting, SERIAL_READ_MAX - len(data)))
        return bytes(data)

    async def read_some(self, timeout_s: float) -> bytes:
        """Bytes received, waiting up to ``timeout_s`` for the first; ``b""`` if none came."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._pending is None:
                if self._ser is None:
                    raise DeviceUnavailable(f"serial {self.name}: not open")
                loop = asyncio.get_running_loop()
                assert self._pool is not None
                self._pending = loop.run_in_executor(self._pool, self._read_blocking)
                self._pending.add_done_callback(_retrieve)
            pending = self._pending
            try:
                # shield: a cancelled caller leaves the read running; its bytes are kept
                data = await asyncio.shield(pending)
            except (serial.SerialException, OSError, TypeError, AttributeError) as err:
                self._pending = None
                await self.close()
                raise DeviceUnavailable(f"serial {self.name}: read failed: {err}") from None
            self._pending = None
            if data or time.monotonic() >= deadline:
                return data

    async def close(self) -> None:
        """Close the port and stop the worker thread. Idempotent, never raises."""
        ser, self._ser = self._ser, None
        pool, self._pool = self._pool, None
        pending, self._pending = self._pending, None
        if pool is None:
            return
        if ser is not None:
            fut = asyncio.get_running_loop().run_in_executor(pool, ser.close)
            with contextlib.suppress(Exception):  # close never raises
                await asyncio.shield(fut)
        del pending  # a read in flight finished before ser.close ran (same thread)
        pool.shutdown(wait=False)


class TcpTransport:
    """A plain TCP connection (raw socket, no telnet negotiation). Construction does no I/O."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 1.0) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"tcp {host}:{port}: port must be in 1..65535")
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self._connect_timeout_s = connect_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect. Raises :class:`DeviceUnavailable` when refused or timed out."""
        await self.close()
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self._connect_timeout_s
            )
        except asyncio.TimeoutError:
            raise DeviceUnavailable(
                f"tcp {self.name}: connect timed out after {self._connect_timeout_s:g} s"
            ) from None
        except OSError as err:
            raise DeviceUnavailable(f"tcp {self.name}: cannot connect: {err}") from None

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits for the socket buffer to drain (bounded by the timeout)."""
        writer = self._writer
        if writer is None:
            raise DeviceUnavailable(f"tcp {self.name}: not connected")
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self._connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as err:
            await self.close()
            raise DeviceUnavailable(f"tcp {self.name}: write failed: {err!r}") from None

    async def read_some(self, timeout_s: float) -> bytes:
        """Bytes received, waiting up to ``timeout_s``; ``b""`` if none came. EOF raises."""
        reader = self._reader
        if reader is None:
            raise DeviceUnavailable(f"tcp {self.name}: not connected")
        try:
            data = await asyncio.wait_for(reader.read(TCP_READ_BYTES), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return b""
        except OSError as err:
            await self.close()
            raise DeviceUnavailable(f"tcp {self.name}: read failed: {err}") from None
        if not data:
            await self.close()
            raise DeviceUnavailable(f"tcp {self.name}: connection closed by the device")
        return data

    async def close(self) -> None:
        """Close the connection. Idempotent, never raises."""
        writer, self._writer = self._writer, None
        self._reader = None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
