"""What every Modbus device (TCP or RTU) does above its transport: poll groups, planned reads,
decoding, the busy retry, string registers, and writes.

A subclass supplies the transport: :meth:`ModbusDevice._open`, :meth:`ModbusDevice._close`,
:meth:`ModbusDevice._read_block` (one read request → its raw block) and
:meth:`ModbusDevice._write` (one write request). Both raise
:class:`~drivers.errors.DeviceException` when the device refuses or garbles one request, and
:class:`~drivers.errors.DeviceUnavailable` when the transport fails (after closing it).

Channels and groups
-------------------
Numeric registers are the device's channels (``channels``, in map order); each belongs to one
poll group (``Register.group``). :meth:`ModbusDevice.read` reads one group (or all) and returns
values aligned with that group's channel indices (``ReadResult.channels``). Each group is planned
on its own, so a slow group never widens the reads of a fast one.

``string`` registers are not channels (a Frame carries float64 values only): they are read once
per connection (serial numbers, firmware versions rarely change) into :attr:`ModbusDevice.strings`.

Retries
-------
Exactly one retry, and only where it helps: a request refused with exception 6 (server device
busy) is sent once more after ``busy_retry_delay_s``. Timeouts are never retried here (the next
poll is the retry, and the supervisor backs off); other exceptions are answers, not accidents.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from drivers.errors import DeviceException
from drivers.modbus.codec import decode
from drivers.modbus.plan import Block, Decoder, ReadRequest, plan_reads
from drivers.modbus.registers import Register, Table
from drivers.quality import ReadResult

log = logging.getLogger(__name__)

#: Modbus exception code "server device busy": the one refusal worth retrying.
BUSY = 6


class ModbusDevice:
    """Planned, grouped reads and writes of one Modbus unit. Subclasses add the transport.

    Construction validates and plans (no I/O). ``timeout_s`` bounds each request's answer.
    ``max_gap``/``max_registers``/``max_bits`` go to :func:`~drivers.modbus.plan.plan_reads`.
    """

    def __init__(
        self,
        unit_id: int,
        registers: Sequence[Register],
        timeout_s: float,
        *,
        max_gap: int = 0,
        max_registers: int = 125,
        max_bits: int = 2000,
        busy_retry_delay_s: float = 0.05,
    ) -> None:
        if not registers:
            raise ValueError("a device needs at least one register")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if busy_retry_delay_s < 0:
            raise ValueError(f"busy_retry_delay_s must be >= 0, got {busy_retry_delay_s}")
        self.unit_id = unit_id
        self.timeout_s = float(timeout_s)
        self.busy_retry_delay_s = float(busy_retry_delay_s)
        self.registers: tuple[Register, ...] = tuple(registers)
        #: Numeric registers: the channels, in map order (string registers excluded).
        self.numeric: tuple[Register, ...] = tuple(r for r in self.registers if r.numeric)
        self.channels: tuple[str, ...] = tuple(r.name for r in self.numeric)
        self.string_registers: tuple[Register, ...] = tuple(
            r for r in self.registers if not r.numeric
        )
        limits = {"max_gap": max_gap, "max_registers": max_registers, "max_bits": max_bits}
        groups: dict[str, list[int]] = {}
        for i, reg in enumerate(self.numeric):
            groups.setdefault(reg.group, []).append(i)
        #: Poll group name → indices into :attr:`channels`.
        self.group_channels: dict[str, np.ndarray] = {}
        self._plans: dict[str, tuple[tuple[ReadRequest, ...], Decoder]] = {}
        for name, idx in groups.items():
            regs = [self.numeric[i] for i in idx]
            requests = plan_reads(regs, **limits)
            self._plans[name] = (requests, Decoder(regs, requests))
            ids = np.array(idx, dtype=np.intp)
            ids.flags.writeable = False
            self.group_channels[name] = ids
        self._all = np.arange(len(self.numeric), dtype=np.intp)
        self._string_requests = plan_reads(self.string_registers, max_registers=max_registers)
        #: String registers by name, read at connect ("" where the read failed).
        self.strings: dict[str, str] = {}
        self.busy_retries = 0

    @property
    def groups(self) -> tuple[str, ...]:
        """The poll groups that have at least one channel, in map order."""
        return tuple(self._plans)

    @property
    def requests(self) -> tuple[ReadRequest, ...]:
        """Every planned read of every group (in group order), for inspection."""
        return tuple(req for requests, _ in self._plans.values() for req in requests)

    async def connect(self) -> None:
        """Open the transport (no-op when open) and read the string registers once."""
        first = not self.connected
        await self._open()
        if first and self.string_registers:
            await self.read_strings()

    async def read(self, group: str | None = None) -> ReadResult:
        """Run the planned reads of ``group`` (``None``: every group) and decode them.

        Values and quality are aligned with ``ReadResult.channels`` (indices into
        :attr:`channels`). A refused or garbled request has its values BAD (NaN) and is listed in
        ``exceptions``. Raises :class:`DeviceUnavailable` when the transport fails.
        """
        if group is not None:
            if group not in self._plans:
                raise KeyError(f"{self!r}: no poll group {group!r} (groups: {self.groups})")
            values, quality, refused = await self._read_group(group)
            return ReadResult(values, quality, tuple(refused), self.group_channels[group])
        if len(self._plans) == 1:  # one group holds every channel, in order: no merging
            values, quality, refused = await self._read_group(next(iter(self._plans)))
            return ReadResult(values, quality, tuple(refused), self._all)
        out_v = np.full(len(self.numeric), np.nan)
        out_q = np.zeros(len(self.numeric), dtype=np.uint8)
        problems: list[DeviceException] = []
        for name in self._plans:
            values, quality, refused = await self._read_group(name)
            idx = self.group_channels[name]
            out_v[idx] = values
            out_q[idx] = quality
            problems += refused
        return ReadResult(out_v, out_q, tuple(problems), self._all)

    async def read_strings(self) -> dict[str, str]:
        """Read every string register now; a refused read leaves its strings ``""``."""
        words: dict[tuple[str, int], int] = {}
        for req in self._string_requests:
            try:
                block = await self._read_retrying(req)
            except DeviceException as err:
                log.debug("%r: string read refused: %s", self, err)
                continue
            for k in range(req.count):
                words[(req.table, req.address + k)] = int(block[k])
        for reg in self.string_registers:
            addr = range(reg.address, reg.address + reg.count)
            if all((reg.table, a) in words for a in addr):
                text = decode([words[(reg.table, a)] for a in addr], "string", reg.order)
                self.strings[reg.name] = str(text)
            else:
                self.strings[reg.name] = ""
        return dict(self.strings)

    async def read_raw(self, table: Table, address: int, count: int = 1) -> list[int]:
        """One read of ``count`` raw words (bits as 0/1 for ``coil``/``discrete``) of ``table``
        from ``address``, outside the poll plan (e.g. a write's read-back). Raises
        ``DeviceException`` if refused, ``DeviceUnavailable`` if the transport fails."""
        block = await self._read_block(ReadRequest(table, address, count, ()))
        return [int(v) for v in block[:count]]  # bits come in whole bytes

    async def write_register(self, address: int, value: int) -> None:
        """FC 6: write one 16-bit register. Raises ``DeviceException`` if refused."""
        await self._write(6, address, [int(value)])

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        """FC 16: write 16-bit registers from ``address``. Raises ``DeviceException``."""
        await self._write(16, address, [int(v) for v in values])

    async def write_coil(self, address: int, value: bool) -> None:
        """FC 5: switch one coil. Raises ``DeviceException`` if refused."""
        await self._write(5, address, [bool(value)])

    async def write_coils(self, address: int, values: Sequence[bool]) -> None:
        """FC 15: write coils from ``address``. Raises ``DeviceException`` if refused."""
        await self._write(15, address, [bool(v) for v in values])

    # -- transport, supplied by subclasses ---------------------------------------------------

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        raise NotImplementedError

    async def _read_block(self, req: ReadRequest) -> Block:
        raise NotImplementedError

    async def _write(
        self, function_code: int, address: int, values: list[int] | list[bool]
    ) -> None:
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------

    async def _read_group(self, group: str) -> tuple[np.ndarray, np.ndarray, list[DeviceException]]:
        requests, decoder = self._plans[group]
        blocks: list[Block | None] = []
        refused: list[DeviceException] = []
        for req in requests:
            try:
                blocks.append(await self._read_retrying(req))
            except DeviceException as err:
                blocks.append(None)
                refused.append(err)
        values, quality = decoder.decode(blocks)
        return values, quality, refused

    async def _read_retrying(self, req: ReadRequest) -> Block:
        """One read; retried once after ``busy_retry_delay_s`` if the device says it is busy."""
        try:
            return await self._read_block(req)
        except DeviceException as err:
            if err.exception_code != BUSY:
                raise
        self.busy_retries += 1
        await asyncio.sleep(self.busy_retry_delay_s)
        return await self._read_block(req)

    def _refused(self, req: ReadRequest, message: str, exception_code: int) -> DeviceException:
        return DeviceException(
            f"{self!r} {req.table} {req.address}+{req.count}: {message}",
            table=req.table,
            address=req.address,
            count=req.count,
            function_code=req.function_code,
            exception_code=exception_code,
        )
