"""The acquisition stage: one polling task per device (and one per waveform reader), started
after the sinks and stopped first. See :mod:`appliance.acquire.poller` for timing, staggering and
availability, :mod:`appliance.acquire.waveform` for waveforms, :mod:`appliance.acquire.link` for
reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from appliance.acquire.link import cancel_and_wait
from appliance.acquire.poller import STAGGER_SLOT_S, DevicePoller, stagger_phases
from appliance.config import DeviceConfig
from appliance.contracts import FrameSink
from drivers.modbus.transport import RtuBus

log = logging.getLogger(__name__)


class Acquisition:
    """Runs one :class:`DevicePoller` task per device; the acquisition stage of the pipeline.

    Each device has its own task, and each device's waveform reader another, so a slow or dead
    device never delays another (RTU units on one port wait for each other's transactions on
    the bus, at most one timeout each). Keyword arguments are passed to every poller (seams and
    backoff, see :class:`DevicePoller`). ``stagger`` (default on) spreads the grids of all poll
    groups (and waveform readers) sharing one interval evenly over it, in device order, in
    slots of at least ``stagger_slot_s`` seconds (see :func:`stagger_phases`). ``start()``
    creates the tasks (call it on the event loop, after the sinks are started); ``stop()``
    cancels them and closes every driver (idempotent, safe before ``start``).
    """

    def __init__(
        self,
        devices: Sequence[DeviceConfig],
        sink: FrameSink,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        stagger: bool = True,
        stagger_slot_s: float = STAGGER_SLOT_S,
    ) -> None:
        #: RTU buses by port, shared by the pollers of the units on each.
        self.buses: dict[str, RtuBus] = {}
        phases, wave_phases = stagger_phases(devices, stagger_slot_s) if stagger else ([], [])
        self.pollers: tuple[DevicePoller, ...] = tuple(
            DevicePoller(
                d,
                sink,
                clock=clock,
                monotonic=monotonic,
                rng=rng,
                backoff_base_s=backoff_base_s,
                backoff_cap_s=backoff_cap_s,
                buses=self.buses,
                phase_s=phases[i] if stagger else 0.0,
                waveform_phase_s=wave_phases[i] if stagger else 0.0,
            )
            for i, d in enumerate(devices)
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        """Start one polling task per device. Idempotent while running."""
        if self._stopped:
            raise RuntimeError("acquisition was stopped; build a new one")
        if self._tasks:
            return
        waveforms = 0
        for poller in self.pollers:
            task = asyncio.create_task(poller.run(), name=f"acquire {poller.name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
            if poller.waveform is not None:
                name = f"acquire {poller.name} waveform"
                task = asyncio.create_task(poller.waveform.run(), name=name)
                task.add_done_callback(self._task_done)
                self._tasks.append(task)
                waveforms += 1
        log.info("acquisition started: %d devices, %d waveforms", len(self.pollers), waveforms)

    async def stop(self) -> None:
        """Cancel every polling task and close every driver. Idempotent."""
        self._stopped = True
        for poller in self.pollers:
            poller.request_stop()
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks, "acquisition")
        await asyncio.gather(*(p.close() for p in self.pollers))
        await asyncio.gather(*(bus.close() for bus in self.buses.values()))
        if tasks:
            log.info("acquisition stopped")

    def stats(self) -> list[dict[str, Any]]:
        """Per-device counters, in device order (see :meth:`DevicePoller.stats`)."""
        return [p.stats() for p in self.pollers]

    async def __aenter__(self) -> Acquisition:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    def _task_done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("%s crashed: %r", task.get_name(), err, exc_info=err)
