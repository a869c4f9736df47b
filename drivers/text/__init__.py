"""Serial text-protocol drivers: Haas machine-data-collection Q commands and streamed lines.

Layered like :mod:`drivers.modbus`: :mod:`~drivers.text.transport` (bytes over a serial port,
a pyserial URL or plain TCP), :mod:`~drivers.text.framing` (bytes → lines, pure), then per
protocol a pure codec and a driver: :mod:`~drivers.text.haas` and :mod:`~drivers.text.line`.
See ``docs/drivers-text.md``.
"""
