"""High-rate waveforms over Modbus: a device's sample FIFO read as one register block.

A vibration sensor samples at ``rate_hz`` (1 kHz and more), far faster than anyone can poll
single registers. Devices that expose such a signal over Modbus do it with a *sample FIFO
window*: a block of registers that always holds the newest ``N`` samples plus a header that
says which samples they are. The client reads the whole block in one request, every
``< N / rate_hz`` seconds, and stitches consecutive blocks into one gap-free stream.

Register layout (``address`` is the block's first register, 0-based request address; every
multi-register field big-endian ``ABCD``)::

    address + 0..1   uint32  first_seq   sequence number of sample[0] (wraps at 2**32)
    address + 2      uint16  count       samples in the block (0..capacity; < capacity only
                                         until the device has produced ``capacity`` samples)
    address + 3      uint16  rate_hz     sample rate (Hz)
    address + 4      uint16  scale_u     engineering units per count, in millionths
                                         (1000 = 0.001 per count)
    address + 5..    int16   sample[0..capacity-1], oldest first; sample[i] has sequence
                             number first_seq + i; only the first ``count`` are valid

:data:`HEADER_REGISTERS` registers of header, then ``capacity`` samples: one read request
(≤ 125 registers) carries at most :data:`MAX_CAPACITY` = 120 samples. The device must update
header and samples together (atomically for a reader), as the simulator does.

:class:`FifoTracker` is the pure part (no I/O, no clock): fed consecutive block reads it returns
only the samples not returned before, each with its sequence number (unwrapped to 64 bits) and
a timestamp, and it detects

* **duplicates**: a block read twice (or a block that overlaps the previous one) yields only the
  new samples; a block with nothing new yields an empty chunk;
* **overruns/gaps**: when the first sequence number is beyond the next expected one, the device
  overwrote samples that were never read; :attr:`WaveformChunk.lost` counts them and the first
  sample after the gap carries :data:`FLAG_GAP`;
* **wrap-around** of the 32-bit counter (modular arithmetic; sequence numbers keep growing);
* **resets**: a newest sequence number that moves backwards (the device restarted) restarts
  the stream: its first sample carries :data:`FLAG_RESYNC`, and the lost count is unknown (0).

Timestamps: the device sends no clock, so the host anchors the newest sample of the first block
at the read time (seconds since the epoch, as passed in) and spaces every later sample exactly
``1 / rate_hz`` apart by sequence number: jitter of the poll does not reach the samples. If the
read time drifts more than ``max_skew_s`` from that prediction (device clock drift, a stall,
a rate change) the anchor is moved to the read time and the next sample carries
:data:`FLAG_RESYNC`. The error of a timestamp is therefore bounded by the read latency plus the
device's own buffering (how long after sampling it publishes) plus ``max_skew_s``.

:class:`WaveformReader` is the transport part: one pymodbus TCP connection that reads the block
and feeds a tracker. Errors follow :mod:`drivers.errors`: transport failures raise
:class:`~drivers.errors.DeviceUnavailable` (connection closed, call :meth:`WaveformReader.connect`
again); an exception response raises :class:`~drivers.errors.DeviceException` (one request per
read, so there is nothing partial to return).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from drivers.errors import MODBUS_EXCEPTION_NAMES, DeviceException, DeviceUnavailable
from drivers.quality import GOOD

__all__ = [
    "FLAG_GAP",
    "FLAG_RESYNC",
    "HEADER_REGISTERS",
    "MAX_CAPACITY",
    "FifoBlock",
    "FifoTracker",
    "WaveformChunk",
    "WaveformReader",
    "encode_block",
    "parse_block",
]

log = logging.getLogger(__name__)

#: Registers before the first sample: first_seq (2), count, rate_hz, scale_u.
HEADER_REGISTERS: Final[int] = 5
#: Most samples one block may hold so that header + samples fit one read (125 registers).
MAX_CAPACITY: Final[int] = 125 - HEADER_REGISTERS
#: Modulus of the sequence counter (uint32).
SEQ_MODULUS: Final[int] = 2**32
#: Per-sample flag: samples were lost immediately before this one (see ``WaveformChunk.lost``).
FLAG_GAP: Final[int] = 1
#: Per-sample flag: the stream (re)started here: first read, device reset, or timestamp re-anchor.
FLAG_RESYNC: Final[int] = 2

U8 = npt.NDArray[np.uint8]
I16 = npt.NDArray[np.int16]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FifoBlock:
    """One decoded block: the header fields and the ``count`` valid raw samples."""

    first_seq: int
    rate_hz: int
    scale: float
    samples: I16

    @property
    def count(self) -> int:
        """Valid samples in the block."""
        return int(self.samples.shape[0])


@dataclass(frozen=True, slots=True)
class WaveformChunk:
    """The samples one read added to the stream, columnar and aligned.

    ``seq``: unwrapped sequence numbers (int64, consecutive); ``ts``: epoch seconds (float64);
    ``value``: engineering units (float64, raw × scale); ``quality``: uint8, all
    :data:`~drivers.quality.GOOD` (a block is read whole or not at all); ``flags``: uint8,
    :data:`FLAG_GAP`/:data:`FLAG_RESYNC` on the first sample after a gap/restart.
    ``lost``: samples the device overwrote before they were read, just before ``seq[0]`` (0 when
    none, or when unknown after a reset). ``duplicates``: samples of the block that had been
    returned before. ``reset``: the device's counter went backwards.
    """

    seq: I64
    ts: F64
    value: F64
    quality: U8
    flags: U8
    lost: int = 0
    duplicates: int = 0
    reset: bool = False

    def __len__(self) -> int:
        return int(self.seq.shape[0])


def parse_block(regs: Sequence[int]) -> FifoBlock:
    """Decode one block read (header + samples) into a :class:`FifoBlock`.

    Raises ``ValueError`` when the block is shorter than its header or than the count it
    announces (a device bug or a wrong address).
    """
    if len(regs) < HEADER_REGISTERS:
        raise ValueError(f"FIFO block needs at least {HEADER_REGISTERS} registers, got {len(regs)}")
    words = np.asarray(regs, dtype=np.uint16)
    first_seq = int(words[0]) << 16 | int(words[1])
    count = int(words[2])
    if count > len(regs) - HEADER_REGISTERS:
        raise ValueError(
            f"FIFO header announces {count} samples but the block holds "
            f"{len(regs) - HEADER_REGISTERS}"
        )
    samples = words[HEADER_REGISTERS : HEADER_REGISTERS + count].view(np.int16).copy()
    return FifoBlock(
        first_seq=first_seq, rate_hz=int(words[3]), scale=int(words[4]) * 1e-6, samples=samples
    )


def encode_block(
    first_seq: int, samples: Sequence[int] | I16, capacity: int, rate_hz: int, scale_u: int
) -> list[int]:
    """Registers of one block (the device side; the inverse of :func:`parse_block`).

    ``samples`` are raw int16 counts, oldest first, at most ``capacity``; unused sample slots
    are 0. ``first_seq`` is taken modulo 2**32.
    """
    raw = np.asarray(samples, dtype=np.int16)
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {capacity}")
    if raw.shape[0] > capacity:
        raise ValueError(f"{raw.shape[0]} samples do not fit a block of {capacity}")
    seq = first_seq % SEQ_MODULUS
    out = np.zeros(HEADER_REGISTERS + capacity, dtype=np.uint16)
    out[0], out[1] = seq >> 16, seq & 0xFFFF
    out[2], out[3], out[4] = raw.shape[0], rate_hz, scale_u
    out[HEADER_REGISTERS : HEADER_REGISTERS + raw.shape[0]] = raw.view(np.uint16)
    return [int(w) for w in out]


def _empty_chunk(duplicates: int) -> WaveformChunk:
    z64 = np.zeros(0, dtype=np.int64)
    zf = np.zeros(0, dtype=np.float64)
    z8 = np.zeros(0, dtype=np.uint8)
    return WaveformChunk(z64, zf, zf, z8, z8.copy(), duplicates=duplicates)


class FifoTracker:
    """Stitches consecutive FIFO block reads into one stream (pure; see the module docstring).

    ``max_skew_s``: how far (seconds) the read time may drift from the sample clock's
    prediction before timestamps are re-anchored. Counters: ``samples`` (returned),
    ``lost`` (overwritten before read), ``duplicates`` (read more than once), ``gaps``,
    ``resets``, ``resyncs``.
    """

    def __init__(self, max_skew_s: float = 0.25) -> None:
        if not max_skew_s > 0:
            raise ValueError(f"max_skew_s must be > 0, got {max_skew_s}")
        self.max_skew_s = float(max_skew_s)
        self._next_seq: int | None = None  # unwrapped sequence number of the next new sample
        self._next_dev = 0  # the device's (wrapped) counter value of that same sample
        self._anchor_seq = 0
        self._anchor_t = 0.0
        self._rate_hz = 0
        self.samples = 0
        self.lost = 0
        self.duplicates = 0
        self.gaps = 0
        self.resets = 0
        self.resyncs = 0

    @property
    def next_seq(self) -> int | None:
        """Unwrapped sequence number of the next sample not yet returned (None before the first)."""
        return self._next_seq

    def update(self, block: FifoBlock, t_read: float) -> WaveformChunk:
        """Feed one block read at ``t_read`` (epoch seconds); return the samples new in it."""
        n = block.count
        if block.rate_hz <= 0:
            raise ValueError(f"FIFO block has sample rate {block.rate_hz} Hz")
        if n == 0:
            return _empty_chunk(0)
        flags0 = 0
        lost = 0
        reset = False
        expected = self._next_seq
        if expected is None:
            first = block.first_seq
            start = first
            flags0 = FLAG_RESYNC
        else:
            # Compare in the device's numbering: after a device restart ours runs ahead of it.
            delta = (block.first_seq - self._next_dev) % SEQ_MODULUS
            if delta >= SEQ_MODULUS // 2:
                delta -= SEQ_MODULUS
            first = expected + delta
            end = first + n
            if end < expected:
                # The newest sample moved backwards: the device restarted its counter.
                reset = True
                self.resets += 1
                first = expected  # keep our sequence numbers increasing across the restart
                start = first
                flags0 = FLAG_RESYNC
                log.debug("FIFO counter went back by %d samples; stream restarted", -delta)
            elif end == expected:
                self.duplicates += n
                return _empty_chunk(n)
            else:
                start = max(first, expected)
                if first > expected:
                    lost = first - expected
                    flags0 = FLAG_GAP
                    self.gaps += 1
                    self.lost += lost
        skip = start - first
        new = n - skip
        self.duplicates += skip
        newest = start + new - 1
        if (
            expected is None
            or reset
            or block.rate_hz != self._rate_hz
            or abs(t_read - self._time_of(newest)) > self.max_skew_s
        ):
            if expected is not None and not reset:
                self.resyncs += 1
            self._rate_hz = block.rate_hz
            self._anchor_seq, self._anchor_t = newest, t_read
            flags0 |= FLAG_RESYNC
        seq = np.arange(start, start + new, dtype=np.int64)
        ts = self._anchor_t + (seq - self._anchor_seq) / float(self._rate_hz)
        value = block.samples[skip:].astype(np.float64) * block.scale
        flags = np.zeros(new, dtype=np.uint8)
        flags[0] = flags0
        self._next_seq = start + new
        self._next_dev = (block.first_seq + n) % SEQ_MODULUS
        self.samples += new
        return WaveformChunk(
            seq=seq,
            ts=ts,
            value=value,
            quality=np.full(new, GOOD, dtype=np.uint8),
            flags=flags,
            lost=lost,
            duplicates=skip,
            reset=reset,
        )

    def _time_of(self, seq: int) -> float:
        return self._anchor_t + (seq - self._anchor_seq) / float(self._rate_hz)


class WaveformReader:
    """Reads a FIFO block from a Modbus TCP device and returns the new samples of each read.

    Construction does no I/O. :meth:`connect`, then :meth:`read` (one request of
    ``HEADER_REGISTERS + capacity`` registers from ``table`` at ``address``), :meth:`close`
    (idempotent). ``timeout_s`` bounds the connect and each answer (seconds). ``clock`` (epoch
    seconds) stamps the reads; pass a fake one in tests. Use from one task at a time.

    Like :class:`drivers.modbus.tcp.ModbusTcpDevice`, pymodbus' own retries and reconnects are
    off: a timeout closes the connection and raises :class:`DeviceUnavailable`; reconnecting
    (with backoff) is the caller's job.
    """

    def __init__(
        self,
        host: str,
        port: int,
        unit_id: int = 1,
        address: int = 200,
        capacity: int = MAX_CAPACITY,
        *,
        table: Literal["holding", "input"] = "input",
        timeout_s: float = 1.0,
        max_skew_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {capacity}")
        if not 0 <= address <= 65536 - HEADER_REGISTERS - capacity:
            raise ValueError(f"block at {address} + {HEADER_REGISTERS + capacity} exceeds 65535")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.address = address
        self.capacity = capacity
        self.table = table
        self.timeout_s = float(timeout_s)
        self.tracker = FifoTracker(max_skew_s)
        self._clock = clock
        self._client: AsyncModbusTcpClient | None = None

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port} unit {self.unit_id} {self.table} {self.address}"
        return f"WaveformReader({where})"

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Open the connection (no-op when open); :class:`DeviceUnavailable` when it fails."""
        if self.connected:
            return
        await self.close()
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.timeout_s, retries=0, reconnect_delay=0
        )
        if not await client.connect() or not client.connected:
            client.close()
            raise DeviceUnavailable(f"cannot connect to {self.host}:{self.port}")
        self._client = client

    async def read(self) -> WaveformChunk:
        """Read the block once and return the samples not returned before.

        Raises :class:`DeviceUnavailable` (connection closed) on a transport failure and
        :class:`DeviceException` on an exception response or a malformed block.
        """
        client = self._client
        if client is None or not client.connected:
            await self.close()
            raise DeviceUnavailable(f"{self.host}:{self.port}: not connected")
        call = (
            client.read_input_registers if self.table == "input" else client.read_holding_registers
        )
        n = HEADER_REGISTERS + self.capacity
        try:
            pdu: Any = await call(self.address, count=n, device_id=self.unit_id)
        except ModbusException as err:
            await self.close()
            raise DeviceUnavailable(f"{self.host}:{self.port}: {err}") from err
        except BaseException:
            await self.close()
            raise
        t_read = self._clock()
        fc = 4 if self.table == "input" else 3
        where = f"{self.host}:{self.port} unit {self.unit_id} {self.table} {self.address}+{n}"
        if pdu.isError():
            code = int(pdu.exception_code)
            raise DeviceException(
                f"{where}: exception {code} ({MODBUS_EXCEPTION_NAMES.get(code, 'unknown')})",
                table=self.table,
                address=self.address,
                count=n,
                function_code=fc,
                exception_code=code,
            )
        try:
            block = parse_block(pdu.registers)
        except ValueError as err:
            raise DeviceException(
                f"{where}: {err}",
                table=self.table,
                address=self.address,
                count=n,
                function_code=fc,
                exception_code=0,
            ) from None
        return self.tracker.update(block, t_read)

    async def stream(self, interval_s: float) -> AsyncIterator[WaveformChunk]:
        """Read every ``interval_s`` seconds on a monotonic grid and yield non-empty chunks.

        Keep ``interval_s`` below ``capacity / rate_hz`` or samples are lost (counted). Errors
        propagate (see :meth:`read`); missed deadlines are skipped, not caught up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            chunk = await self.read()
            if len(chunk):
                yield chunk
            deadline += interval_s
            now = loop.time()
            if deadline < now:
                deadline += ((now - deadline) // interval_s + 1) * interval_s
            await asyncio.sleep(deadline - now)

    async def close(self) -> None:
        """Close the connection. Idempotent; never raises."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
