"""Modbus TCP device: one connection, the planned reads of one register map, quality per value.

The transaction layer over :mod:`drivers.modbus.plan` (what to read, how to decode) and
``pymodbus.client.AsyncModbusTcpClient`` (framing, transaction ids, the socket).

Retries and reconnects — who does what
--------------------------------------
Retry in exactly one layer per concern. pymodbus 3.16 has two loops of its own, both turned off
here:

* ``retries=0``: pymodbus would resend a request that got no answer within ``timeout`` (and only
  give up after ``retries + 1`` timeouts, ``retries + 3`` of them in a row before it drops the
  link). On TCP a missing answer means the link or the device is in trouble; resending on the
  same connection doubles the time a poll blocks and risks a late answer being matched to the
  wrong request. So one timeout raises :class:`~drivers.errors.DeviceUnavailable` and this
  device closes its connection, which also discards any late answer. The next poll is the retry.
* ``reconnect_delay=0``: pymodbus would reconnect on its own after a lost connection (a hidden
  task with its own uncapped, unjittered doubling). Reconnects belong to the supervisor
  (``appliance.acquire``), which backs off with full jitter and logs the state transitions.

A connection that the peer closes is noticed at once (pymodbus' connect trace callback), so a
request in flight fails immediately instead of waiting out ``timeout_s``.

Requests are sent one after another on the one connection (pymodbus serialises them anyway, and
many devices cannot pipeline). A Modbus exception response to one request marks only that
request's values BAD; the connection stays up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from drivers.errors import MODBUS_EXCEPTION_NAMES, DeviceException, DeviceUnavailable
from drivers.modbus.plan import Block, Decoder, ReadRequest, plan_reads
from drivers.modbus.registers import Register
from drivers.quality import BAD, GOOD, STALE, ReadResult

__all__ = ["BAD", "GOOD", "STALE", "ModbusTcpDevice", "ReadResult"]

log = logging.getLogger(__name__)


class ModbusTcpDevice:
    """A Modbus TCP server (``host:port``, unit ``unit_id``) read as one register map.

    Construction validates and plans, and does no I/O. Call :meth:`connect`, then :meth:`read`
    once per poll, and :meth:`close` when done (idempotent). Use from one asyncio task at a time;
    the instance is not shared between event loops.

    ``timeout_s`` bounds the TCP connect and each request's answer (seconds). ``max_gap`` is
    passed to :func:`~drivers.modbus.plan.plan_reads` (unused addresses one read may span).
    """

    def __init__(
        self,
        host: str,
        port: int,
        unit_id: int,
        registers: Sequence[Register],
        timeout_s: float = 1.0,
        *,
        max_gap: int = 0,
        max_registers: int = 125,
        max_bits: int = 2000,
    ) -> None:
        if not registers:
            raise ValueError("a device needs at least one register")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if not 0 <= unit_id <= 255:
            raise ValueError(f"unit_id must be in 0..255, got {unit_id}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.timeout_s = float(timeout_s)
        self.registers: tuple[Register, ...] = tuple(registers)
        self.requests: tuple[ReadRequest, ...] = plan_reads(
            self.registers, max_gap=max_gap, max_registers=max_registers, max_bits=max_bits
        )
        self._decoder = Decoder(self.registers, self.requests)
        self._client: AsyncModbusTcpClient | None = None
        self._lost: asyncio.Future[None] | None = None
        self._connect_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"ModbusTcpDevice({self.host}:{self.port} unit {self.unit_id})"

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still fail on the next request)."""
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Open the TCP connection (a no-op when connected).

        Raises :class:`DeviceUnavailable` if the connection is refused or not made within
        ``timeout_s``.
        """
        if self.connected:
            return
        await self.close()
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=f"{self.host}:{self.port}",
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_connect=lambda up: self._on_link(lost, up),
        )
        self._connect_error = None
        self._capture_connect_error(client)
        try:
            ok = await client.connect()
        except BaseException:
            client.close()
            raise
        if not ok or not client.connected:
            client.close()
            reason = self._connect_error
            if isinstance(reason, OSError) and reason.errno:
                detail = os.strerror(reason.errno).lower()
            elif isinstance(reason, OSError):
                detail = str(reason)
            else:
                detail = f"no connection within {self.timeout_s:g} s"
            raise DeviceUnavailable(f"cannot connect to {self.host}:{self.port}: {detail}")
        self._client, self._lost = client, lost
        log.debug("connected to %s:%s", self.host, self.port)

    async def read(self) -> ReadResult:
        """Run every planned read once and decode all values.

        Returns values and per-value quality aligned with ``registers``; a request refused with
        a Modbus exception response (or answered short) has its values BAD and is listed in
        ``exceptions``. Raises :class:`DeviceUnavailable` (and closes the connection) when not
        connected, on a timeout, or when the connection is lost.
        """
        client = self._client
        if client is None or not client.connected:
            await self.close()
            raise DeviceUnavailable(f"{self.host}:{self.port}: not connected")
        blocks: list[Block | None] = []
        refused: list[DeviceException] = []
        for req in self.requests:
            pdu = await self._exchange(client, req)
            block, problem = self._check(req, pdu)
            blocks.append(block)
            if problem is not None:
                refused.append(problem)
        values, quality = self._decoder.decode(blocks)
        return ReadResult(values=values, quality=quality, exceptions=tuple(refused))

    async def close(self) -> None:
        """Close the connection. Idempotent; never raises."""
        client, self._client = self._client, None
        lost, self._lost = self._lost, None
        if lost is not None and not lost.done():
            lost.cancel()
        if client is not None:
            client.close()

    # -- internals ---------------------------------------------------------------------------

    async def _exchange(self, client: AsyncModbusTcpClient, req: ReadRequest) -> ModbusPDU:
        """Send one read and wait for its answer, or for the peer to drop the connection."""
        call: Callable[..., Awaitable[ModbusPDU]] = {
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }[req.table]
        lost = self._lost
        task: asyncio.Future[ModbusPDU] | None = None
        try:
            try:
                task = asyncio.ensure_future(
                    call(req.address, count=req.count, device_id=self.unit_id)
                )
                waiting: tuple[asyncio.Future[Any], ...] = (task,) if lost is None else (task, lost)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    raise DeviceUnavailable(f"{self.host}:{self.port}: connection lost")
                return task.result()
            except ModbusException as err:
                raise DeviceUnavailable(f"{self.host}:{self.port}: {_describe(err)}") from err
        except BaseException:
            await self.close()
            raise
        finally:
            if task is not None:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # mark retrieved: no "exception never retrieved" noise

    def _check(
        self, req: ReadRequest, pdu: ModbusPDU
    ) -> tuple[Block | None, DeviceException | None]:
        """The usable block of one answer, or ``None`` and why it is not usable."""
        where = f"{self.host}:{self.port} unit {self.unit_id} {req.table} {req.address}+{req.count}"
        if pdu.isError():
            code = int(pdu.exception_code)
            name = MODBUS_EXCEPTION_NAMES.get(code, "unknown exception")
            return None, DeviceException(
                f"{where}: exception {code} ({name})",
                table=req.table,
                address=req.address,
                count=req.count,
                function_code=req.function_code,
                exception_code=code,
            )
        block: Block = pdu.bits if req.table in ("coil", "discrete") else pdu.registers
        if len(block) < req.count:
            return None, DeviceException(
                f"{where}: answered {len(block)} values",
                table=req.table,
                address=req.address,
                count=req.count,
                function_code=req.function_code,
                exception_code=0,
            )
        return block, None

    def _on_link(self, lost: asyncio.Future[None], up: bool) -> None:
        """pymodbus' connect trace: resolve ``lost`` when the peer drops the connection."""
        if not up and not lost.done():
            log.debug("%s:%s closed the connection", self.host, self.port)
            lost.set_result(None)

    def _capture_connect_error(self, client: AsyncModbusTcpClient) -> None:
        """Keep the reason a connect failed (pymodbus only logs it and returns False).

        Wraps pymodbus' internal ``ctx.call_create``; if a later 3.x renames it we lose only the
        detail in the error message, never the error itself.
        """
        ctx: Any = getattr(client, "ctx", None)
        create = getattr(ctx, "call_create", None)
        if create is None:
            return

        async def create_and_remember() -> Any:
            try:
                return await create()
            except BaseException as err:
                self._connect_error = err
                raise

        ctx.call_create = create_and_remember


def _describe(err: ModbusException) -> str:
    """pymodbus' exception text without its ``Modbus Error: [..]`` wrapping."""
    text = str(err)
    if "No response received" in text:
        return "no answer within the timeout"
    return text
