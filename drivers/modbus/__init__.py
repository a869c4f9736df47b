"""Modbus drivers, layered like pymodbus.

transport → framing → codec (pure: ``codec.py``, ``plan.py``) → device transactions (``tcp.py``).
"""
