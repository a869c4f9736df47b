"""The CNC cell simulator behind ``appliance simulate``: Modbus TCP servers fed by machine models.

:mod:`appliance.simulate.machine` is the pure, deterministic model of one machine;
:mod:`appliance.simulate.cell` serves a cell of them over Modbus TCP with the ``cnc-sim``
register map; :mod:`appliance.simulate.cli` is the sub-command. See ``docs/simulator.md``.
"""

from appliance.simulate.cell import FaultSchedule, SimulatedCell
from appliance.simulate.machine import CHANNELS, FAULT_KINDS, CncMachine, ProgramState

__all__ = [
    "CHANNELS",
    "FAULT_KINDS",
    "CncMachine",
    "FaultSchedule",
    "ProgramState",
    "SimulatedCell",
]
