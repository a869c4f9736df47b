"""Helpers shared by the acquisition tests (imported as ``acqhelp``: test dirs are not
packages, so pytest puts this directory on ``sys.path``)."""

from __future__ import annotations

import asyncio

from pymodbus.simulator import DataType, SimData, SimDevice


def cnc_sim_device() -> SimDevice:
    """A pymodbus simulated device with the cnc-sim register map, encoded by pymodbus."""
    return SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [
                SimData(0, values=[70000], datatype=DataType.UINT32),
                SimData(2, values=[1], datatype=DataType.UINT16),
            ],
            [
                SimData(0, values=[1200], datatype=DataType.UINT16),
                SimData(1, values=[455, -12, 30, 0], datatype=DataType.INT16),
                SimData(5, values=[38.25, 21.5, 1.75], datatype=DataType.FLOAT32),
            ],
        ),
    )


class FakeClock:
    """Monotonic seconds that only move when the poller sleeps (a test double for time, passed
    through the poller's ``monotonic``/``sleep`` seams). After ``stop_after_sleeps`` sleeps the
    poller is parked (that sleep never returns) and ``stopped`` is set, so the test can close it
    at a known point."""

    def __init__(self, stop_after_sleeps: int) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.stop_after_sleeps = stop_after_sleeps
        self.stopped = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) >= self.stop_after_sleeps:
            self.stopped.set()
            await asyncio.Event().wait()  # parked until close() cancels the poller
