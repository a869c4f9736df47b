"""Modbus RTU device: one unit id on a shared :class:`~drivers.modbus.transport.RtuBus`.

Layers: :mod:`~drivers.modbus.transport` moves bytes (one lock and one thread per port, frame
gaps, local echo); :mod:`~drivers.modbus.framing` builds and checks frames (pure);
:mod:`~drivers.modbus.device` plans, decodes, groups, retries a busy unit once and writes.

What failures mean on a shared line:

* no reply within ``timeout_s``: the unit is silent (powered off, wrong id, cable cut). The
  device raises :class:`~drivers.errors.DeviceUnavailable` and the poller backs off; the bus
  stays open for the other units, which wait at most this one timeout.
* garbage (bad CRC, another unit's or function's reply, wrong byte count): counted in
  ``frame_errors``; that request's values are BAD; the bus flushed its input and polling goes on.
* an exception reply: that request's values are BAD (exception 6 is retried once).
"""

from __future__ import annotations

from collections.abc import Sequence

from drivers.errors import MODBUS_EXCEPTION_NAMES, DeviceException, DeviceUnavailable
from drivers.modbus import framing
from drivers.modbus.device import ModbusDevice
from drivers.modbus.framing import FrameError
from drivers.modbus.plan import Block, ReadRequest
from drivers.modbus.registers import Register
from drivers.modbus.transport import NoReply, RtuBus


class ModbusRtuDevice(ModbusDevice):
    """One RTU unit (``unit_id`` 1..247) on ``bus``. Construction does no I/O.

    :meth:`connect` attaches to the bus (opening the port if this is its first user);
    :meth:`close` detaches (the last user closes the port); idempotent. ``frame_errors`` counts
    garbled replies.
    """

    def __init__(
        self,
        bus: RtuBus,
        unit_id: int,
        registers: Sequence[Register],
        timeout_s: float = 1.0,
        *,
        max_gap: int = 0,
        max_registers: int = 125,
        max_bits: int = 2000,
        busy_retry_delay_s: float = 0.05,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"RTU unit_id must be in 1..247, got {unit_id}")
        super().__init__(
            unit_id,
            registers,
            timeout_s,
            max_gap=max_gap,
            max_registers=max_registers,
            max_bits=max_bits,
            busy_retry_delay_s=busy_retry_delay_s,
        )
        self.bus = bus
        self._attached = False
        self.frame_errors = 0

    def __repr__(self) -> str:
        return f"ModbusRtuDevice({self.bus.url} unit {self.unit_id})"

    @property
    def connected(self) -> bool:
        """True while attached to an open bus."""
        return self._attached and self.bus.is_open

    async def _open(self) -> None:
        if self._attached and self.bus.is_open:
            return
        if not self._attached:
            await self.bus.open()
            self._attached = True

    async def close(self) -> None:
        """Detach from the bus. Idempotent; never raises."""
        if self._attached:
            self._attached = False
            await self.bus.release()

    async def _transact(self, request: bytes, function_code: int) -> framing.Reply:
        if not self._attached:
            raise DeviceUnavailable(f"{self!r}: not connected")
        try:
            return await self.bus.transact(request, function_code, self.timeout_s)
        except NoReply as err:
            await self.close()
            raise DeviceUnavailable(f"{self!r}: {err}") from None
        except DeviceUnavailable:
            await self.close()
            raise

    async def _read_block(self, req: ReadRequest) -> Block:
        fc = req.function_code
        request = framing.read_request(self.unit_id, fc, req.address, req.count)
        try:
            reply = await self._transact(request, fc)
            if reply.exception_code:
                code = reply.exception_code
                name = MODBUS_EXCEPTION_NAMES.get(code, "unknown exception")
                raise self._refused(req, f"exception {code} ({name})", code)
            if fc in (1, 2):
                return framing.bits_of(reply, req.count)
            return framing.registers_of(reply, req.count)
        except FrameError as err:
            self.frame_errors += 1
            raise self._refused(req, f"garbled reply: {err}", 0) from None

    async def _write(
        self, function_code: int, address: int, values: list[int] | list[bool]
    ) -> None:
        unit = self.unit_id
        if function_code == 5:
            request = framing.write_single_coil(unit, address, bool(values[0]))
        elif function_code == 6:
            request = framing.write_single_register(unit, address, int(values[0]))
        elif function_code == 15:
            request = framing.write_multiple_coils(unit, address, [bool(v) for v in values])
        else:
            request = framing.write_multiple_registers(unit, address, [int(v) for v in values])
        where = f"{self!r} write FC {function_code} at {address}"
        table = "coil" if function_code in (5, 15) else "holding"
        try:
            reply = await self._transact(request, function_code)
            if not reply.exception_code:
                framing.check_write_echo(reply, request)
                return
            code = reply.exception_code
            message = f"exception {code} ({MODBUS_EXCEPTION_NAMES.get(code, 'unknown')})"
        except FrameError as err:
            self.frame_errors += 1
            code, message = 0, f"garbled reply: {err}"
        raise DeviceException(
            f"{where}: {message}",
            table=table,
            address=address,
            count=len(values),
            function_code=function_code,
            exception_code=code,
        )
