"""The CNC cell simulator behind ``appliance simulate``: Modbus TCP servers fed by machine models.

:mod:`appliance.simulate.machine` is the pure, deterministic model of one machine;
:mod:`appliance.simulate.cell` serves a cell of them over Modbus TCP with the ``cnc-sim``
register map (plus a vibration FIFO, byte-order variants and transport faults);
:mod:`appliance.simulate.fifo` is the FIFO's signal, :mod:`appliance.simulate.replay` the CSV
replay; :mod:`appliance.simulate.cli` is the sub-command. See ``docs/simulator.md``.
"""

from appliance.simulate.cell import (
    ALL_FAULT_KINDS,
    DEVICE_FAULT_KINDS,
    FaultSchedule,
    SimulatedCell,
    with_byte_order,
)
from appliance.simulate.fifo import VibrationFifo
from appliance.simulate.machine import CHANNELS, FAULT_KINDS, CncMachine, ProgramState
from appliance.simulate.replay import Replay, load_replay, parse_map

__all__ = [
    "ALL_FAULT_KINDS",
    "CHANNELS",
    "DEVICE_FAULT_KINDS",
    "FAULT_KINDS",
    "CncMachine",
    "FaultSchedule",
    "ProgramState",
    "Replay",
    "SimulatedCell",
    "VibrationFifo",
    "load_replay",
    "parse_map",
    "with_byte_order",
]
