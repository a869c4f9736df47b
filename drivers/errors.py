"""The drivers' error taxonomy, independent of ``appliance/`` (which maps these onto its own).

Two kinds of failure need different handling by whoever supervises a device:

* :class:`DeviceUnavailable`: the transport failed (connect refused or timed out, no answer
  within the timeout, connection lost, a garbled stream). Nothing read in that transaction can be
  trusted; the driver has closed its connection and the supervisor reconnects with backoff.
* :class:`DeviceException`: the device is there and answered, but refused or garbled one request
  (a Modbus exception response, a short answer). Only the values of that request are BAD; the
  connection stays up. Drivers report these inside their read result rather than raising, so one
  bad address does not blank a whole poll.
"""

from __future__ import annotations

#: Modbus exception codes (Modbus Application Protocol v1.1b3, section 7) → their names.
MODBUS_EXCEPTION_NAMES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class DriverError(Exception):
    """Base class of every error a driver raises or reports."""


class DeviceUnavailable(DriverError):
    """The transport to the device failed: connect refused/timed out, no answer, link lost.

    The driver has closed its connection when it raises this; call ``connect()`` again (after a
    backoff) to resume.
    """


class DeviceException(DriverError):
    """The device answered one request with an exception response or an unusable answer.

    ``function_code`` is the request's function code (1..4 for reads); ``exception_code`` is
    the Modbus exception code, or 0 when the answer was malformed rather than refused.
    ``table``/``address``/``count`` describe the refused request.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str,
        address: int,
        count: int,
        function_code: int,
        exception_code: int,
    ) -> None:
        super().__init__(message)
        self.table = table
        self.address = address
        self.count = count
        self.function_code = function_code
        self.exception_code = exception_code
