"""Modbus drivers, layered like pymodbus.

=================  ==========================================================================
``transport.py``   bytes: the RTU bus (one serial port or ``socket://`` gateway, one lock, one
                   worker thread, inter-frame gaps, local echo, flush after garbage)
``framing.py``     pure: RTU frames, CRC-16, reply sizing and checks
``codec.py``       pure: registers ↔ typed values, byte orders
``plan.py``        pure: register map → fewest reads; columnar decoding (scale, offset, units)
``registers.py``   register maps and profiles (validated)
``device.py``      transactions shared by TCP and RTU: poll groups, busy retry, strings, writes
``tcp.py``         Modbus TCP device (pymodbus client)
``rtu.py``         Modbus RTU device (one unit id on an :class:`~drivers.modbus.transport.RtuBus`)
=================  ==========================================================================
"""
