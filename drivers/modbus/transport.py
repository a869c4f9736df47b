"""The RTU bus: one serial line (or a serial-over-TCP gateway) shared by every unit on it.

One :class:`RtuBus` per port. Every transaction (request out, reply in) holds the bus's
``asyncio.Lock``, so the units on one RS-485 line never talk over each other, and the bus keeps
a minimum silence between frames (``inter_frame_gap_s``; default 3.5 character times from the
line settings, 1.75 ms above 19200 baud, per Modbus over Serial Line v1.02 section 2.5.1.1).

Threading: pyserial is blocking. Each bus runs its port in one dedicated worker thread (a
single-thread executor created by :meth:`RtuBus.open`), and the event loop awaits each exchange
there. Reads use pyserial's timeout, so a thread never blocks longer than the request timeout;
and because the executor has one thread, even a transaction whose awaiting task was cancelled
finishes before the next one touches the port. ``loop.add_reader`` on the fd would avoid the
thread but does not work for ``socket://``/``rfc2217://`` URLs or on Windows; one thread per
port is cheap.

URLs: anything :func:`serial.serial_for_url` opens: a device path (``/dev/ttyUSB0``,
``/dev/ttyS1``), ``socket://host:port`` (RTU over TCP to a serial gateway: the same frames, CRC
and all, on a TCP stream; line settings are then the gateway's business) or ``rfc2217://``.

RS-485 adapters without automatic echo suppression read back what they send: with
``local_echo=True`` the bus reads and checks the echoed request before waiting for the reply.

After garbage (a bad CRC, a reply that cannot be sized, an incomplete reply) the bus waits until
the line is silent and flushes its input buffer, so the next transaction starts clean.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import serial

from drivers.errors import DeviceUnavailable
from drivers.modbus.framing import (
    MAX_ADU,
    FrameError,
    Reply,
    inter_frame_gap_s,
    parse_reply,
    reply_length,
)

log = logging.getLogger(__name__)

Parity = str  # "N", "E", "O"


class NoReply(Exception):
    """No byte of a reply arrived within the timeout (the unit is silent)."""


class RtuBus:
    """One serial port shared by the RTU units on it. Construction does no I/O.

    Devices call :meth:`open` when they connect and :meth:`release` when they close; the port is
    opened by the first and closed after the last. :meth:`close` closes it regardless
    (idempotent). ``stats()`` counts transactions, silent units, garbage and echo errors.
    """

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 19200,
        bytesize: int = 8,
        parity: Parity = "E",
        stopbits: float = 1,
        inter_frame_gap_ms: float | None = None,
        local_echo: bool = False,
    ) -> None:
        if not url:
            raise ValueError("an RTU bus needs a port (a device path or socket://host:port)")
        if baudrate <= 0:
            raise ValueError(f"baudrate must be > 0, got {baudrate}")
        if parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be 'N', 'E' or 'O', got {parity!r}")
        if bytesize not in (7, 8) or stopbits not in (1, 1.5, 2):
            raise ValueError(f"unsupported line settings: bytesize {bytesize}, stopbits {stopbits}")
        if inter_frame_gap_ms is not None and inter_frame_gap_ms < 0:
            raise ValueError(f"inter_frame_gap_ms must be >= 0, got {inter_frame_gap_ms}")
        self.url = url
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits
        self.local_echo = local_echo
        #: Minimum silence between the end of one frame and the start of the next (seconds).
        self.inter_frame_gap_s = (
            inter_frame_gap_s(baudrate, bytesize, parity, stopbits)
            if inter_frame_gap_ms is None
            else inter_frame_gap_ms / 1000.0
        )
        self._serial: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._users = 0
        self._last_frame_end = 0.0
        self.transactions = 0
        self.no_replies = 0
        self.garbage = 0
        self.opens = 0

    def __repr__(self) -> str:
        return f"RtuBus({self.url})"

    @property
    def is_open(self) -> bool:
        """True while the port is open."""
        return self._serial is not None

    def stats(self) -> dict[str, int | float | str]:
        """Bus counters: transactions, replies that never came, garbage replies, port opens."""
        return {
            "port": self.url,
            "transactions": self.transactions,
            "no_replies": self.no_replies,
            "garbage": self.garbage,
            "opens": self.opens,
            "inter_frame_gap_ms": self.inter_frame_gap_s * 1000.0,
        }

    async def open(self) -> None:
        """Register one user and open the port if it is closed. Raises ``DeviceUnavailable``."""
        self._users += 1
        try:
            await self._ensure_open()
        except BaseException:
            self._users -= 1
            raise

    async def release(self) -> None:
        """Unregister one user; the last one closes the port. Never raises."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            await self.close()

    async def close(self) -> None:
        """Close the port and stop its thread. Idempotent; never raises."""
        ser, self._serial = self._serial, None
        executor, self._executor = self._executor, None
        if executor is not None:
            if ser is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, ser.close)
                except Exception as err:  # closing must not fail the caller
                    log.debug("%r: close failed: %s", self, err)
            executor.shutdown(wait=False)

    async def transact(self, request: bytes, function_code: int, timeout_s: float) -> Reply:
        """Send one request ADU and return its checked reply (CRC, unit, function code, size).

        Raises :class:`NoReply` when nothing arrives within ``timeout_s``, :class:`FrameError`
        for garbage (after flushing the input), :class:`DeviceUnavailable` when the port fails
        (after closing it).
        """
        async with self._lock:
            await self._ensure_open()
            executor = self._executor
            assert executor is not None
            loop = asyncio.get_running_loop()
            self.transactions += 1
            try:
                return await loop.run_in_executor(
                    executor, self._exchange, request, function_code, timeout_s
                )
            except NoReply:
                self.no_replies += 1
                raise
            except FrameError:
                self.garbage += 1
                raise
            except (serial.SerialException, OSError) as err:
                await self.close()
                raise DeviceUnavailable(f"{self.url}: port failed: {err}") from err

    # -- internals (the worker thread) -------------------------------------------------------

    async def _ensure_open(self) -> None:
        if self._serial is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rtu {self.url}")
        try:
            ser = await asyncio.get_running_loop().run_in_executor(executor, self._open_port)
        except (serial.SerialException, OSError, ValueError) as err:
            executor.shutdown(wait=False)
            raise DeviceUnavailable(f"cannot open {self.url}: {err}") from err
        if self._serial is not None:  # another user opened it meanwhile
            executor.submit(ser.close)
            executor.shutdown(wait=False)
            return
        self._serial, self._executor = ser, executor
        self.opens += 1
        log.debug(
            "%r open (%s baud %s%s%s)",
            self,
            self.baudrate,
            self.bytesize,
            self.parity,
            self.stopbits,
        )

    def _open_port(self) -> Any:
        ser = serial.serial_for_url(self.url, do_not_open=True)
        ser.baudrate = self.baudrate
        ser.bytesize = self.bytesize
        ser.parity = self.parity
        ser.stopbits = self.stopbits
        ser.timeout = 0.1
        ser.open()
        return ser

    def _exchange(self, request: bytes, function_code: int, timeout_s: float) -> Reply:
        ser = self._serial
        if ser is None:
            raise serial.SerialException("port closed")
        wait = self._last_frame_end + self.inter_frame_gap_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            ser.reset_input_buffer()
            ser.write(request)
            ser.flush()
            deadline = time.monotonic() + timeout_s
            if self.local_echo:
                echo = self._read(ser, len(request), deadline)
                if echo != request:
                    raise FrameError(f"local echo {echo.hex(' ')} differs from the request")
            buf = bytearray()
            while True:
                total = reply_length(bytes(buf), function_code)
                if total is not None and total > MAX_ADU:
                    raise FrameError(f"reply header {buf.hex(' ')} announces {total} bytes")
                want = total if total is not None else (2 if len(buf) < 2 else 3)
                if total is not None and len(buf) >= want:
                    return parse_reply(bytes(buf[:want]), request[0], function_code)
                chunk = self._read(ser, want - len(buf), deadline)
                if len(chunk) < want - len(buf):
                    buf += chunk
                    if not buf:
                        raise NoReply(f"no reply within {timeout_s:g} s")
                    raise FrameError(f"incomplete reply {buf.hex(' ')} after {timeout_s:g} s")
                buf += chunk
        except FrameError:
            self._drain(ser)
            raise
        finally:
            self._last_frame_end = time.monotonic()

    @staticmethod
    def _read(ser: Any, n: int, deadline: float) -> bytes:
        out = bytearray()
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ser.timeout = remaining
            chunk = ser.read(n - len(out))
            if chunk:
                out += chunk
        return bytes(out)

    def _drain(self, ser: Any) -> None:
        """Discard input until the line has been silent for a frame gap (at most 0.5 s)."""
        quiet = max(self.inter_frame_gap_s, 0.02)
        give_up = time.monotonic() + 0.5
        ser.timeout = quiet
        while time.monotonic() < give_up and ser.read(MAX_ADU):
            pass
        ser.reset_input_buffer()
