"""Modbus TCP device: one connection, the planned reads of one register map, quality per value.

The transaction layer over :mod:`drivers.modbus.plan` (what to read, how to decode) and one of
two clients, chosen per device (``client``, the config key of the same name):

* ``"native"`` (the default): :class:`~drivers.modbus.mbap.MbapClient`, our own
  ``asyncio.Protocol`` (MBAP framing, transaction ids, one future and one timeout handle per
  request, no task); FC 3/4 replies are decoded straight from the reply bytes
  (``np.frombuffer``). A device's reads cost about half the CPU of the pymodbus client's, the
  whole acquisition path 30-45 % less per request (issue 11; docs/benchmarks.md, "Saturation").
* ``"pymodbus"``: ``pymodbus.client.AsyncModbusTcpClient`` (framing, transaction ids, the
  socket), kept for devices the native client has not met yet.

Both behave the same way, as follows.

Retries and reconnects — who does what
--------------------------------------
Retry in exactly one layer per concern. Neither client retries or reconnects on its own
(pymodbus 3.16 has two loops of its own, both turned off here):

* no retries (pymodbus: ``retries=0``): pymodbus would resend a request that got no answer within
  ``timeout`` (and only give up after ``retries + 1`` timeouts, ``retries + 3`` of them in a row
  before it drops the link). On TCP a missing answer means the link or the device is in trouble;
  resending on the same connection doubles the time a poll blocks and risks a late answer being
  matched to the wrong request. So one timeout raises :class:`~drivers.errors.DeviceUnavailable`
  and this device closes its connection, which also discards any late answer (the native client
  also matches replies by transaction id and discards, counted, any other). The next poll is the
  retry.
* no reconnects (pymodbus: ``reconnect_delay=0``): pymodbus would reconnect on its own after a
  lost connection (a hidden task with its own uncapped, unjittered doubling). Reconnects belong
  to the supervisor (``appliance.acquire``), which backs off with full jitter and logs the state
  transitions.

A connection that the peer closes is noticed at once (the native client's ``connection_lost``;
pymodbus' connect trace callback), so a request in flight fails immediately instead of waiting
out ``timeout_s``.

A malformed reply (a byte count larger than the frame, a length field that cannot be, a function
code that answers nothing we asked) fails the request in flight at once with the reason
(:class:`DeviceUnavailable`, "malformed reply: ...") and closes the connection, so the supervisor
logs one WARNING per episode naming it; details go to DEBUG, and no ERROR traceback is logged.
(pymodbus' framer raises inside the protocol's ``data_received``, which asyncio would log as an
ERROR with a 14-line traceback, "Fatal error: protocol.data_received() call failed"; for the
pymodbus client the received bytes are discarded instead and the traceback goes to DEBUG.)

Requests are sent one after another on the one connection (pymodbus serialises them anyway, and
many devices cannot pipeline). A Modbus exception response to one request marks only that
request's values BAD; the connection stays up. A write whose reply does not echo its address and
value/quantity (native client) raises :class:`DeviceException` ("garbled reply"). Poll groups,
decoding, the busy retry and writes live in :mod:`drivers.modbus.device`, shared with RTU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import numpy as np
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from drivers.errors import MODBUS_EXCEPTION_NAMES, DeviceException, DeviceUnavailable
from drivers.modbus import framing
from drivers.modbus.device import ModbusDevice
from drivers.modbus.framing import FrameError
from drivers.modbus.mbap import MbapClient
from drivers.modbus.plan import Block, ReadRequest
from drivers.modbus.registers import Register
from drivers.quality import BAD, GOOD, STALE, ReadResult

__all__ = ["BAD", "CLIENTS", "GOOD", "STALE", "ModbusTcpDevice", "ReadResult", "TcpClient"]

#: The Modbus TCP clients a device can use (config key ``client``).
TcpClient = Literal["native", "pymodbus"]
CLIENTS: tuple[TcpClient, ...] = ("native", "pymodbus")

log = logging.getLogger(__name__)


class ModbusTcpDevice(ModbusDevice):
    """A Modbus TCP server (``host:port``, unit ``unit_id``) read as one register map.

    Construction validates and plans, and does no I/O. Call :meth:`connect`, then
    :meth:`~drivers.modbus.device.ModbusDevice.read` once per poll (of one group or all), and
    :meth:`close` when done (idempotent). Use from one asyncio task at a time; the instance is
    not shared between event loops. Writes (``write_registers``, ``write_coils``, ...) come from
    :class:`~drivers.modbus.device.ModbusDevice`.

    ``timeout_s`` bounds the TCP connect and each request's answer (seconds). ``max_gap`` is
    passed to :func:`~drivers.modbus.plan.plan_reads` (unused addresses one read may span).
    ``client`` picks the Modbus TCP client (see the module docstring).
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
        busy_retry_delay_s: float = 0.05,
        client: TcpClient = "native",
    ) -> None:
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {client!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if not 0 <= unit_id <= 255:
            raise ValueError(f"unit_id must be in 0..255, got {unit_id}")
        super().__init__(
            unit_id,
            registers,
            timeout_s,
            max_gap=max_gap,
            max_registers=max_registers,
            max_bits=max_bits,
            busy_retry_delay_s=busy_retry_delay_s,
        )
        self.host = host
        self.port = port
        self.client: TcpClient = client
        self._native: MbapClient | None = None
        self._discarded_before = 0  # the counters of the native client's closed connections
        self._malformed_before = 0
        self._client: AsyncModbusTcpClient | None = None
        self._lost: asyncio.Future[None] | None = None
        self._connect_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"ModbusTcpDevice({self.host}:{self.port} unit {self.unit_id})"

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still fail on the next request)."""
        if self.client == "native":
            return self._native is not None and self._native.connected
        return self._client is not None and self._client.connected

    @property
    def discarded_replies(self) -> int:
        """Replies the native client discarded (another transaction id), every connection."""
        native = self._native
        return self._discarded_before + (native.discarded if native is not None else 0)

    @property
    def malformed_replies(self) -> int:
        """Malformed replies the native client refused, every connection."""
        native = self._native
        return self._malformed_before + (native.malformed if native is not None else 0)

    async def _open(self) -> None:
        """Open the TCP connection (a no-op when connected).

        Raises :class:`DeviceUnavailable` if the connection is refused or not made within
        ``timeout_s``.
        """
        if self.connected:
            return
        await self.close()
        if self.client == "native":
            self._native = await MbapClient.open(self.host, self.port, self.unit_id, self.timeout_s)
            log.debug("connected to %s:%s", self.host, self.port)
            return
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
        client.register(HoldingRegistersResponse)
        client.register(InputRegistersResponse)
        self._connect_error = None
        self._capture_connect_error(client)
        self._guard_replies(client)
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

    async def close(self) -> None:
        """Close the connection. Idempotent; never raises."""
        native, self._native = self._native, None
        if native is not None:
            self._discarded_before += native.discarded
            self._malformed_before += native.malformed
            native.close()
        client, self._client = self._client, None
        lost, self._lost = self._lost, None
        if lost is not None and not lost.done():
            lost.cancel()
        if client is not None:
            client.close()

    # -- internals ---------------------------------------------------------------------------

    def _live_client(self) -> AsyncModbusTcpClient:
        client = self._client
        if client is None or not client.connected:
            raise DeviceUnavailable(f"{self.host}:{self.port}: not connected")
        return client

    async def _read_block(self, req: ReadRequest) -> Block:
        """One read request; raises ``DeviceException`` for an exception or a short answer."""
        if self.client == "native":
            return await self._read_native(req)
        try:
            client = self._live_client()
        except DeviceUnavailable:
            await self.close()
            raise
        call: Callable[..., Awaitable[ModbusPDU]] = {
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }[req.table]
        pdu = await self._exchange(
            lambda: call(req.address, count=req.count, device_id=self.unit_id)
        )
        if pdu.isError():
            code = int(pdu.exception_code)
            name = MODBUS_EXCEPTION_NAMES.get(code, "unknown exception")
            raise self._refused(req, f"exception {code} ({name})", code)
        block: Block = pdu.bits if req.table in ("coil", "discrete") else pdu.registers
        if len(block) < req.count:
            raise self._refused(req, f"answered {len(block)} values", 0)
        return block

    async def _write(
        self, function_code: int, address: int, values: list[int] | list[bool]
    ) -> None:
        """One write request (FC 5/6/15/16); ``DeviceException`` when refused."""
        if self.client == "native":
            return await self._write_native(function_code, address, values)
        try:
            client = self._live_client()
        except DeviceUnavailable:
            await self.close()
            raise
        unit = self.unit_id
        calls: dict[int, Callable[[], Awaitable[ModbusPDU]]] = {
            5: lambda: client.write_coil(address, bool(values[0]), device_id=unit),
            6: lambda: client.write_register(address, int(values[0]), device_id=unit),
            15: lambda: client.write_coils(address, [bool(v) for v in values], device_id=unit),
            16: lambda: client.write_registers(address, [int(v) for v in values], device_id=unit),
        }
        pdu = await self._exchange(calls[function_code])
        if pdu.isError():
            code = int(pdu.exception_code)
            name = MODBUS_EXCEPTION_NAMES.get(code, "unknown exception")
            table = "coil" if function_code in (5, 15) else "holding"
            raise DeviceException(
                f"{self!r} write FC {function_code} at {address}: exception {code} ({name})",
                table=table,
                address=address,
                count=len(values),
                function_code=function_code,
                exception_code=code,
            )

    async def _ask(self, pdu: bytes) -> bytes:
        """One request on the native client (waiting its turn behind another task's request);
        closes the connection when it fails."""
        native = self._native
        if native is None:
            raise DeviceUnavailable(f"{self.host}:{self.port}: not connected")
        try:
            return await native.request(pdu)
        except BaseException:
            if self._native is native:  # not a newer connection opened while this one waited
                await self.close()
            raise

    async def _read_native(self, req: ReadRequest) -> Block:
        fc = req.function_code
        reply = await self._ask(framing.read_pdu(fc, req.address, req.count))
        if reply[0] != fc:  # the exception form (the client checked the rest)
            code = reply[1]
            name = MODBUS_EXCEPTION_NAMES.get(code, "unknown exception")
            raise self._refused(req, f"exception {code} ({name})", code)
        if fc >= 3:
            answered = reply[1] // 2
            if answered < req.count:
                raise self._refused(req, f"answered {answered} values", 0)
            return np.frombuffer(reply, ">u2", req.count, 2)
        answered = reply[1] * 8
        if answered < req.count:
            raise self._refused(req, f"answered {answered} values", 0)
        bits = framing.reply_of_pdu(self.unit_id, fc, reply[: 2 + (req.count + 7) // 8])
        return framing.bits_of(bits, req.count)

    async def _write_native(
        self, function_code: int, address: int, values: list[int] | list[bool]
    ) -> None:
        if function_code == 5:
            request = framing.write_single_coil_pdu(address, bool(values[0]))
        elif function_code == 6:
            request = framing.write_single_register_pdu(address, int(values[0]))
        elif function_code == 15:
            request = framing.write_multiple_coils_pdu(address, [bool(v) for v in values])
        else:
            request = framing.write_multiple_registers_pdu(address, [int(v) for v in values])
        pdu = await self._ask(request)
        reply = framing.reply_of_pdu(self.unit_id, function_code, pdu)
        if not reply.exception_code:
            try:
                framing.check_write_echo_pdu(reply, request)
                return
            except FrameError as err:
                code, message = 0, f"garbled reply: {err}"
        else:
            code = reply.exception_code
            message = f"exception {code} ({MODBUS_EXCEPTION_NAMES.get(code, 'unknown exception')})"
        raise DeviceException(
            f"{self!r} write FC {function_code} at {address}: {message}",
            table="coil" if function_code in (5, 15) else "holding",
            address=address,
            count=len(values),
            function_code=function_code,
            exception_code=code,
        )

    async def _exchange(self, send: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        """Send one request and wait for its answer, or for the peer to drop the connection."""
        lost = self._lost
        task: asyncio.Future[ModbusPDU] | None = None
        try:
            try:
                task = asyncio.ensure_future(send())
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

    def _guard_replies(self, client: AsyncModbusTcpClient) -> None:
        """Turn a malformed reply into a failed request instead of an exception escaping
        pymodbus' ``data_received`` (see the module docstring).

        Wraps pymodbus' internal ``ctx.callback_data``; if a later 3.x renames it, malformed
        replies are handled by pymodbus and asyncio as before (an ERROR log, a lost connection).
        """
        ctx: Any = getattr(client, "ctx", None)
        receive = getattr(ctx, "callback_data", None)
        if receive is None:
            return

        def receive_or_refuse(data: bytes, addr: tuple[str, int] | None = None) -> int:
            try:
                used: int = receive(data, addr=addr)
            except ModbusException as err:
                log.debug(
                    "%s:%s sent a malformed reply (%d bytes: %s)",
                    self.host,
                    self.port,
                    len(data),
                    bytes(data[:32]).hex(),
                    exc_info=True,
                )
                why = err.__cause__ or err.__context__ or err  # pymodbus wraps the reason
                reason = _describe(why) if isinstance(why, ModbusException) else str(why)
                pending = getattr(ctx, "response_future", None)
                if pending is not None and not pending.done():
                    pending.set_exception(
                        ModbusIOException(
                            f"malformed reply: {reason} ({len(data)} bytes: "
                            f"{bytes(data[:16]).hex()}{'...' if len(data) > 16 else ''})"
                        )
                    )
                return len(data)  # out of step with the device: drop what arrived
            return used

        ctx.callback_data = receive_or_refuse


def _describe(err: ModbusException) -> str:
    """pymodbus' exception text without its ``Modbus Error: [..]`` wrapping."""
    text = str(err)
    if "No response received" in text:
        return "no answer within the timeout"
    return text.replace("Modbus Error: [Input/Output] ", "")


def decode_registers(pdu: ModbusPDU, data: bytes) -> None:
    """``pdu.registers`` from a FC 3/4 response body (byte count, then big-endian words) in one
    ``struct.unpack``; :class:`ModbusIOException` when the byte count runs past the body, as
    pymodbus' own decoder does (which unpacks one register per call; an odd last byte is
    ignored by both)."""
    size = data[0] if data else 0
    if not data or size >= len(data):
        raise ModbusIOException(
            f"byte_count {size} does not fit a body of {len(data)} bytes",
            function_code=pdu.function_code,
        )
    pdu.registers = list(struct.unpack_from(f">{size // 2}H", data, 1))


class HoldingRegistersResponse(ReadHoldingRegistersResponse):
    """FC 3 response registered with every client of this driver: decoded in one
    ``struct.unpack`` (:func:`decode_registers`) and described without its registers.
    pymodbus decodes a register per call and formats the whole response for a debug line on
    every decode, log level regardless: ~13 us of CPU for a 50-register reply, a tenth of
    the acquisition's cost per request at saturation (issue 11)."""

    def decode(self, data: bytes) -> None:
        decode_registers(self, data)

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, registers={len(self.registers)})"


class InputRegistersResponse(ReadInputRegistersResponse):
    """FC 4: as :class:`HoldingRegistersResponse`."""

    def decode(self, data: bytes) -> None:
        decode_registers(self, data)

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, registers={len(self.registers)})"
