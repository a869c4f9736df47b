"""Modbus TCP transport of our own: MBAP-framed requests on one asyncio connection.

:class:`MbapClient` is an :class:`asyncio.Protocol`: no task of its own and none per request.
:meth:`MbapClient.request` writes one request PDU behind an MBAP header (its own transaction id,
protocol id 0, the length, the unit id) and awaits a future that ``data_received`` resolves with
the reply PDU; one request is in flight per connection. The timeout is one
``loop.call_later`` handle per request, cancelled when the reply comes. Framing and PDU sizing
are :mod:`drivers.modbus.framing`'s; decoding the PDU is the device's
(:class:`~drivers.modbus.tcp.ModbusTcpDevice`).

What can come back, and what it does (every failure is a
:class:`~drivers.errors.DeviceUnavailable` naming ``host:port``; the device then closes the
connection, and the supervisor reconnects):

* the reply, possibly split over several ``data_received`` calls (partial frames are buffered)
  or several replies in one: the one whose transaction id is the request's resolves it;
* a frame with another transaction id (a late answer to a request that timed out, a duplicate):
  discarded and counted (``discarded``), never matched to the request in flight, which keeps
  waiting;
* a frame with the request's transaction id from another unit (unless the request went to unit
  0, which any unit id may answer, as pymodbus accepts), or for another function (not the
  request's code nor its exception form), or a PDU whose size does not fit its function (a byte
  count running past the frame, an exception reply that is not 2 bytes): it answers nothing we
  asked and the connection is out of step, so it is counted (``malformed``) and the request fails
  at once with ``"malformed reply: ..."``, the connection closed (waiting out the timeout would
  only delay the same outcome). So does a header that cannot be a Modbus frame (protocol id not
  0, a length outside 2..254), whatever its transaction id. Nothing is raised inside
  ``data_received``, so asyncio logs no ERROR traceback;
* an exception response (function code | 0x80) is a reply like any other: the caller turns it
  into a :class:`~drivers.errors.DeviceException` and the connection stays up;
* nothing within ``timeout_s``: ``"no answer within the timeout"``;
* the peer closing the connection (``connection_lost``): the request in flight fails at once with
  ``"connection lost"``.

No retries here, no reconnects: see :mod:`drivers.modbus.tcp`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from drivers.errors import DeviceUnavailable
from drivers.modbus.framing import (
    MAX_PDU,
    MBAP_HEADER,
    READ_FUNCTIONS,
    FrameError,
    pdu_reply_length,
)

__all__ = ["MbapClient"]

log = logging.getLogger(__name__)

_HEADER_SIZE = MBAP_HEADER.size  # 7: the unit id is the last header byte
_pack_header = MBAP_HEADER.pack
_unpack_header = MBAP_HEADER.unpack_from


class MbapClient(asyncio.Protocol):
    """One Modbus TCP connection to unit ``unit_id`` of ``host:port``.

    Open with :meth:`open` (a classmethod; construction itself does no I/O), send with
    :meth:`request`, close with :meth:`close` (idempotent). One request in flight: requests
    from several tasks (the poller, a write from the API) are sent one after the other, each
    timed from when it is sent. ``discarded`` and ``malformed`` count replies thrown away (see
    the module docstring).
    """

    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float) -> None:
        self.name = f"{host}:{port}"
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.timeout_s = timeout_s
        self.discarded = 0
        self.malformed = 0
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._tid = 0
        #: The request in flight: transaction id, function code, the future of its reply PDU.
        self._waiting_tid = -1
        self._waiting_fc = 0
        self._future: asyncio.Future[bytes] | None = None
        #: One request in flight: another task's request (a write from the API while the
        #: poller reads) waits for its turn, as pymodbus' own lock makes it.
        self._turn = asyncio.Lock()

    @classmethod
    async def open(cls, host: str, port: int, unit_id: int, timeout_s: float) -> MbapClient:
        """Connect; :class:`DeviceUnavailable` if refused or not made within ``timeout_s``."""
        client = cls(host, port, unit_id, timeout_s)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: client, host, port), timeout_s)
        except asyncio.TimeoutError:
            detail = f"no connection within {timeout_s:g} s"
        except OSError as err:  # refused, unreachable, a name that does not resolve...
            if err.errno is not None and err.errno > 0:
                detail = os.strerror(err.errno).lower()
            else:
                detail = (err.strerror or str(err)).lower()
        else:
            return client
        raise DeviceUnavailable(f"cannot connect to {host}:{port}: {detail}")

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        transport = self._transport
        return transport is not None and not transport.is_closing()

    def close(self) -> None:
        """Close the connection; a request in flight fails with "connection lost". Idempotent."""
        transport = self._transport
        if transport is not None:
            transport.close()

    async def request(self, pdu: bytes) -> bytes:
        """Send ``pdu`` and return the reply PDU: the request's function code (a normal reply,
        sized as its function says) or its exception form (2 bytes). Raises
        :class:`DeviceUnavailable` (see the module docstring); the caller closes the connection.
        """
        await self._turn.acquire()  # no suspension unless another task's request is in flight
        try:
            transport = self._transport
            if transport is None or transport.is_closing():
                raise DeviceUnavailable(f"{self.name}: not connected")
            loop = asyncio.get_running_loop()
            tid = self._tid = self._tid % 0xFFFF + 1
            future: asyncio.Future[bytes] = loop.create_future()
            self._future, self._waiting_tid, self._waiting_fc = future, tid, pdu[0]
            timer = loop.call_later(self.timeout_s, self._time_out, future)
            try:
                transport.write(_pack_header(tid, 0, len(pdu) + 1, self.unit_id) + pdu)
                return await future
            finally:
                timer.cancel()
                self._future = None
                self._waiting_tid = -1
        finally:
            self._turn.release()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        log.debug("%s: connection closed (%s)", self.name, exc or "no error")
        self._fail("connection lost")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        while len(buffer) >= _HEADER_SIZE:
            tid, protocol, length, unit = _unpack_header(buffer)
            if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
                self._refuse(f"MBAP header with protocol id {protocol}, length {length}", buffer)
                return
            end = 6 + length
            if len(buffer) < end:
                break
            if not self._frame(tid, unit, buffer[_HEADER_SIZE:end], buffer[:end]):
                return
            buffer = buffer[end:]
        self._buffer = buffer

    # -- internals ---------------------------------------------------------------------------

    def _frame(self, tid: int, unit: int, pdu: bytes, frame: bytes) -> bool:
        """One whole frame: resolve the request in flight with it, or throw it away. False when
        it was malformed (the connection is closing: stop reading)."""
        future = self._future
        if future is None or tid != self._waiting_tid or future.done():
            self.discarded += 1
            log.debug("%s: discarded a reply to no request in flight: %s", self.name, frame.hex())
            return True
        fc = self._waiting_fc
        if unit != self.unit_id and self.unit_id != 0:
            self._refuse(f"reply from unit {unit}, expected {self.unit_id}", frame)
            return False
        try:
            size = pdu_reply_length(pdu, fc)
        except FrameError as err:
            self._refuse(str(err), frame)
            return False
        if size is None:
            self._refuse("a read reply without its byte count", frame)
            return False
        # A read's data may be followed by padding (as pymodbus accepts); nothing else may.
        if size > len(pdu) or (size < len(pdu) and (pdu[0] != fc or fc not in READ_FUNCTIONS)):
            if pdu[0] == fc and fc in READ_FUNCTIONS:
                reason = f"byte count {pdu[1]} runs past a PDU of {len(pdu)} bytes"
            else:
                reason = f"a PDU of {len(pdu)} bytes for function code {pdu[0]:#04x}, not {size}"
            self._refuse(reason, frame)
            return False
        future.set_result(pdu)
        return True

    def _refuse(self, reason: str, frame: bytes) -> None:
        """A malformed reply: fail the request in flight with the reason, close the connection,
        drop what is buffered (out of step with the device)."""
        self.malformed += 1
        self._buffer = b""
        log.debug("%s: malformed reply (%s): %s", self.name, reason, frame[:64].hex())
        more = "..." if len(frame) > 16 else ""
        self._fail(f"malformed reply: {reason} ({len(frame)} bytes: {frame[:16].hex()}{more})")
        self.close()

    def _fail(self, reason: str) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_exception(DeviceUnavailable(f"{self.name}: {reason}"))

    def _time_out(self, future: asyncio.Future[bytes]) -> None:
        if not future.done():
            future.set_exception(DeviceUnavailable(f"{self.name}: no answer within the timeout"))
