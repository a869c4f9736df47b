"""Modbus drivers, layered like pymodbus: transport, framing, codec (pure), device (transactions)."""
