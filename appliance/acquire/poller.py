"""Per-device polling: one asyncio task per device, frames out, reconnects with backoff.

:class:`DevicePoller` owns one driver (today :class:`drivers.modbus.tcp.ModbusTcpDevice`) and
runs it on a fixed monotonic grid: the ``k``-th poll is due at ``t0 + k * interval``, so timing
errors never accumulate (no drift). A poll that finishes so late that the next deadline is more
than one interval gone skips the missed deadlines (counted in ``overruns``) instead of bursting
to catch up.

Failure handling follows the one-layer-per-concern rule: the driver does the transaction (and
raises :class:`~drivers.errors.DeviceUnavailable` when the transport fails, closing its
connection); the poller reconnects, with capped exponential backoff and full jitter
(``delay = rng() * min(cap, base * 2**attempt)``, AWS Architecture Blog "Exponential Backoff And
Jitter"), so a cell full of machines that lost power together does not reconnect in lockstep.
The attempt counter resets only after a successful poll, so a device that accepts TCP but never
answers still backs off.

Logging follows state transitions, not repetitions: one warning when a device goes offline,
one info when it is back online, debug in between. The same holds for requests the device
refuses with an exception response (one warning when they start, one info when they stop).

Overload policy: frames go to ``sink`` synchronously on the event loop, one per successful
poll; the sink must not block (see ``appliance.contracts.FrameSink``). A sink that raises stops
this device's poller (the bug surfaces in the log through :class:`Acquisition`) rather than
being silently skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from appliance.config import DeviceConfig, ModbusTcpConfig
from appliance.contracts import Frame
from drivers.errors import DeviceUnavailable
from drivers.modbus.tcp import ModbusTcpDevice
from drivers.quality import ReadResult

log = logging.getLogger(__name__)

State = Literal["connecting", "online", "offline"]
FrameCallback = Callable[[Frame], None]


class PolledDevice(Protocol):
    """What a poller needs from a driver. ``connect``/``read`` raise ``DeviceUnavailable`` when
    the transport fails (having closed the connection); ``close`` is idempotent and never
    raises. ``read`` returns values aligned with the device's register list."""

    async def connect(self) -> None: ...

    async def read(self) -> ReadResult: ...

    async def close(self) -> None: ...


def make_driver(device: DeviceConfig) -> PolledDevice:
    """The driver for one configured device (no I/O). Raises ``ValueError`` on an unusable
    config, e.g. a device whose profile was not resolved into registers by ``load_config``."""
    if not device.registers:
        raise ValueError(
            f"device {device.name}: no registers (load the config with load_config, which "
            f"resolves profile {device.profile!r})"
        )
    if isinstance(device, ModbusTcpConfig):
        return ModbusTcpDevice(
            device.host, device.port, device.unit_id, device.registers, device.timeout_s
        )
    raise ValueError(f"device {device.name}: unsupported device type {type(device).__name__}")


class DevicePoller:
    """Polls one device every ``device.poll_interval_ms`` and hands each poll to ``sink``.

    Construction does no I/O. :meth:`run` is the long-running coroutine (one task per device;
    it returns only when cancelled or closed); :meth:`close` stops it and closes the driver
    (idempotent). ``state`` and :meth:`stats` may be read from any code on the same loop.

    Seams for tests and simulation: ``clock`` (wall-clock seconds, stamps frames), ``monotonic``
    (seconds, drives deadlines), ``rng`` (uniform in [0, 1), jitters backoff), ``sleep``
    (awaits seconds), ``driver`` (replaces the driver built from ``device``).
    ``backoff_base_s``/``backoff_cap_s`` shape reconnect delays (seconds).
    """

    def __init__(
        self,
        device: DeviceConfig,
        sink: FrameCallback,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        driver: PolledDevice | None = None,
    ) -> None:
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ValueError(
                f"need 0 < backoff_base_s <= backoff_cap_s, got {backoff_base_s}, {backoff_cap_s}"
            )
        self.device = device
        self.name = device.name
        self.interval_s = device.poll_interval_ms / 1000.0
        self._driver = driver if driver is not None else make_driver(device)
        self._sink = sink
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng
        self._sleep = sleep
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        #: Channel names, created once and shared by every frame of this device.
        self.channels: tuple[str, ...] = tuple(r.name for r in device.registers)
        ids = np.arange(len(self.channels), dtype=np.int32)
        ids.flags.writeable = False
        self._channel_ids: npt.NDArray[np.int32] = ids
        self._state: State = "connecting"
        self._refusing = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.polls = 0
        self.errors = 0
        self.exception_responses = 0
        self.overruns = 0
        self.reconnects = 0
        self.last_jitter_ms = 0.0
        self.last_poll_ts = 0.0

    @property
    def state(self) -> State:
        """``connecting`` until the first poll succeeds or fails, then ``online``/``offline``."""
        return self._state

    def stats(self) -> dict[str, float | int | str]:
        """Counters for metrics and the devices API (a fresh dict; counts since construction).

        ``errors``: transport failures (connects and polls); ``reconnects``: reconnect attempts;
        ``exception_responses``: requests the device refused; ``overruns``: skipped deadlines;
        ``last_jitter_ms``: how late the last poll started; ``last_poll_ts``: its epoch seconds.
        """
        return {
            "device": self.name,
            "state": self._state,
            "polls": self.polls,
            "errors": self.errors,
            "exception_responses": self.exception_responses,
            "overruns": self.overruns,
            "reconnects": self.reconnects,
            "last_jitter_ms": self.last_jitter_ms,
            "last_poll_ts": self.last_poll_ts,
        }

    async def run(self) -> None:
        """Connect, poll until the transport fails, back off, reconnect; until cancelled.

        Raises only what the sink or a driver bug raises (never ``DeviceUnavailable``).
        """
        if self._task is not None:
            raise RuntimeError(f"device {self.name}: poller is already running")
        self._task = asyncio.current_task()
        attempt = 0
        try:
            while not self._closed:
                try:
                    await self._driver.connect()
                    await self._poll_until_failure()
                except DeviceUnavailable as err:
                    self.errors += 1
                    await self._driver.close()
                    if self._state == "online":
                        attempt = 0
                    self._went_offline(err)
                if self._closed:
                    break
                delay = self._rng() * min(
                    self._backoff_cap_s, self._backoff_base_s * 2.0 ** min(attempt, 32)
                )
                attempt += 1
                log.debug("device %s: reconnect attempt %d in %.3f s", self.name, attempt, delay)
                await self._sleep(delay)
                self.reconnects += 1
        finally:
            self._task = None
            await self._driver.close()

    async def close(self) -> None:
        """Stop :meth:`run` (cancelling its task) and close the driver. Idempotent."""
        self._closed = True
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait((task,))
        await self._driver.close()

    async def _poll_until_failure(self) -> None:
        """Poll on the deadline grid until the driver raises ``DeviceUnavailable``."""
        interval = self.interval_s
        deadline = self._monotonic()
        while not self._closed:
            delay = deadline - self._monotonic()
            if delay > 0:
                await self._sleep(delay)
            self.last_jitter_ms = (self._monotonic() - deadline) * 1000.0
            result = await self._driver.read()
            self._emit(result)
            deadline += interval
            late_s = self._monotonic() - deadline
            if late_s > interval:
                missed = int(late_s // interval)
                self.overruns += missed
                deadline += missed * interval
                log.debug("device %s: poll overran, skipped %d deadlines", self.name, missed)

    def _emit(self, result: ReadResult) -> None:
        ts = self._clock()
        self.polls += 1
        self.last_poll_ts = ts
        if self._state != "online":
            log.info("device %s online (%s:%s)", self.name, self.device.host, self.device.port)
            self._state = "online"
        self._note_refusals(result)
        n = len(self.channels)
        self._sink(
            Frame(
                device=self.name,
                channels=self.channels,
                ts=np.full(n, ts, dtype=np.float64),
                channel=self._channel_ids,
                value=result.values,
                quality=result.quality,
            )
        )

    def _note_refusals(self, result: ReadResult) -> None:
        if result.exceptions:
            self.exception_responses += len(result.exceptions)
            if not self._refusing:
                log.warning(
                    "device %s refuses %d of its reads: %s",
                    self.name,
                    len(result.exceptions),
                    result.exceptions[0],
                )
                self._refusing = True
            else:
                log.debug("device %s still refuses: %s", self.name, result.exceptions[0])
        elif self._refusing:
            log.info("device %s answers all reads again", self.name)
            self._refusing = False

    def _went_offline(self, err: DeviceUnavailable) -> None:
        if self._state != "offline":
            log.warning("device %s offline: %s", self.name, err)
            self._state = "offline"
        else:
            log.debug("device %s still offline: %s", self.name, err)


class Acquisition:
    """Runs one :class:`DevicePoller` task per device; the acquisition stage of the pipeline.

    Each device has its own task, so a slow or dead device never delays another. Keyword
    arguments are passed to every poller (seams and backoff, see :class:`DevicePoller`).
    ``start()`` creates the tasks (call it on the event loop, after the sinks are started);
    ``stop()`` cancels them and closes every driver (idempotent, safe before ``start``).
    """

    def __init__(
        self,
        devices: Sequence[DeviceConfig],
        sink: FrameCallback,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
    ) -> None:
        self.pollers: tuple[DevicePoller, ...] = tuple(
            DevicePoller(
                d,
                sink,
                clock=clock,
                monotonic=monotonic,
                rng=rng,
                backoff_base_s=backoff_base_s,
                backoff_cap_s=backoff_cap_s,
            )
            for d in devices
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        """Start one polling task per device. Idempotent while running."""
        if self._stopped:
            raise RuntimeError("acquisition was stopped; build a new one")
        if self._tasks:
            return
        for poller in self.pollers:
            task = asyncio.create_task(poller.run(), name=f"acquire {poller.name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        log.info("acquisition started: %d devices", len(self.pollers))

    async def stop(self) -> None:
        """Cancel every polling task and close every driver. Idempotent."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await asyncio.gather(*(p.close() for p in self.pollers))
        if tasks:
            log.info("acquisition stopped")

    def stats(self) -> list[dict[str, float | int | str]]:
        """Per-device counters, in device order."""
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
