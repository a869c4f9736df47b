"""High-rate waveforms into the pipeline: one task per device that reads the device's sample
FIFO (:mod:`drivers.modbus.waveform`) and emits every new sample as part of a ``Frame``.

Design
------
A Modbus TCP device with a ``[devices.waveform]`` table (``appliance.config.WaveformConfig``)
gets a :class:`WaveformPoller` next to its register :class:`~appliance.acquire.poller.DevicePoller`
(``DevicePoller.waveform``). It has its **own connection** (a
:class:`~drivers.modbus.waveform.WaveformReader`), its own task and its own fixed monotonic
deadline grid at ``interval_ms``, so a 125-register FIFO read every 50 ms never queues behind
(or delays) the register polls, and a dead device delays nobody: reconnects use the same capped
exponential backoff with full jitter as the poller
(:class:`~appliance.acquire.link.LinkTask`).

Frames: one per read that brought new samples, carrying **all** of them (``n`` samples of one
channel: ``Frame.ts`` per sample, spaced ``1 / rate_hz`` by sequence number, anchored by
:class:`~drivers.modbus.waveform.FifoTracker`; ``Frame.channel`` all the waveform channel's
index). The waveform channel is the **last entry of the device's one channels tuple**
(``DevicePoller.channels``: the numeric registers, then the waveform channel), created once and
referenced by both the register frames and the waveform frames, because consumers key on it:
``WindowAggregator`` keeps one open window per device and closes it when ``Frame.channels`` is a
different object. So a device's window holds register statistics and waveform statistics side
by side (e.g. ``vibration_rms`` mean from the register next to ``vibration_wave`` rms from 1000
samples), and telemetry publishes them in one message.

Gaps (the FIFO overwrote samples before they were read: reads too slow, a stall, an outage)
are marked in three ways, none of them dishonest about the samples that did arrive:

* **in the stream**: one placeholder sample of quality BAD, value NaN, stamped at the time of
  the first lost sample, goes in front of the first sample after the gap. Consumers that look
  at raw frames (alert rules, a future waveform uplink) see where the stream is broken; window
  statistics skip it like any BAD value, so a window's ``count`` of the waveform channel is the
  number of samples that really arrived (e.g. 880 instead of 1000): telemetry's ``n`` shows the
  loss per window. The samples around the gap keep quality GOOD: they are real measurements.
* **in the counters** (:meth:`WaveformPoller.stats`, under ``waveform`` in the device's stats):
  ``samples``, ``lost``, ``gaps``, ``duplicates``, ``resets``, ``resyncs``, ``overruns``.
* **in the log**: one WARNING when a gap episode starts (with the read interval and what the
  FIFO holds, the usual cause), DEBUG for further gaps, one INFO once the stream has been
  continuous for :data:`GAP_QUIET_S` (with the episode's totals).

A device counter reset (``resets``) or a timestamp re-anchor (``resyncs``) inserts no
placeholder: no sample is known to be missing (a reset's loss is unknown). Nothing is repeated
while the device is offline: a stale copy of a waveform sample means nothing.

Quirk: ``WindowAggregator`` places a whole frame by its last sample's time, so up to one read's
samples (``interval_ms``) near a window boundary land in the neighbouring window, and a waveform
frame whose newest sample is older than a register frame that already opened the next window
is counted in its ``late_frames`` (and folded in, not dropped).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from appliance.acquire.link import LinkTask, State, next_deadline
from appliance.config import ModbusTcpConfig
from appliance.contracts import Frame, FrameSink
from drivers.errors import DeviceException, DeviceUnavailable
from drivers.modbus.waveform import (
    FLAG_GAP,
    FLAG_RESYNC,
    MAX_CAPACITY,
    WaveformChunk,
    WaveformReader,
)
from drivers.quality import BAD

log = logging.getLogger(__name__)

#: Seconds without a gap after which a gap episode is over (logged once at INFO).
GAP_QUIET_S = 10.0


class WaveformSource(Protocol):
    """What a :class:`WaveformPoller` needs from a FIFO reader (``WaveformReader``):
    ``connect``/``read`` raise ``DeviceUnavailable`` when the transport fails (connection
    closed); ``read`` raises ``DeviceException`` for a refused or malformed block and returns
    the samples new since the previous read; ``close`` is idempotent and never raises."""

    async def connect(self) -> None: ...

    async def read(self) -> WaveformChunk: ...

    async def close(self) -> None: ...


class WaveformPoller(LinkTask):
    """Reads one device's sample FIFO every ``waveform.interval_ms`` and emits the new samples.

    ``channels`` is the device's channel tuple (``DevicePoller.channels``), shared by every
    frame; the waveform channel must be in it. Construction does no I/O. :meth:`run` is the
    long-running coroutine (returns when cancelled or closed); :meth:`close` stops it and
    closes the connection (idempotent). ``phase_s`` delays the read grid (seconds, modulo the
    interval). Seams as in :class:`~appliance.acquire.poller.DevicePoller`: ``clock`` (epoch
    seconds, anchors sample times), ``monotonic``, ``rng``, ``sleep``; ``source`` replaces the
    :class:`~drivers.modbus.waveform.WaveformReader` built from ``device``.
    """

    def __init__(
        self,
        device: ModbusTcpConfig,
        channels: tuple[str, ...],
        sink: FrameSink,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        phase_s: float = 0.0,
        source: WaveformSource | None = None,
    ) -> None:
        wave = device.waveform
        if wave is None:
            raise ValueError(f"device {device.name}: no waveform table")
        if wave.channel not in channels:
            raise ValueError(f"device {device.name}: {wave.channel!r} is not in {channels}")
        super().__init__(
            f"device {device.name} waveform",
            rng=rng,
            sleep=sleep,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
        )
        self.name = device.name
        self.channel = wave.channel
        self.channels = channels
        self.interval_s = wave.interval_ms / 1000.0
        self.phase_s = phase_s % self.interval_s
        self.capacity = wave.capacity
        self._where = f"{device.host}:{device.port} {wave.table} {wave.address}"
        self._source: WaveformSource = (
            source
            if source is not None
            else WaveformReader(
                device.host,
                device.port,
                device.unit_id,
                wave.address,
                wave.capacity,
                table=wave.table,
                timeout_s=device.timeout_s,
                max_skew_s=wave.max_skew_s,
                clock=clock,
            )
        )
        self._sink = sink
        self._monotonic = monotonic
        ids = np.full(MAX_CAPACITY + 1, channels.index(wave.channel), dtype=np.int32)
        ids.flags.writeable = False
        self._ids: npt.NDArray[np.int32] = ids  # sliced per frame (a slice stays read-only)
        self._state: State = "connecting"
        self._grid_t0: float | None = None
        self._first_chunk = True
        self._episode = False  # in a gap episode
        self._episode_lost = 0
        self._episode_gaps = 0
        self._last_gap_at = 0.0
        #: Sample rate (Hz) seen in the stream (0 until two samples arrived in one read).
        self.rate_hz = 0.0
        self.reads = 0
        self.samples = 0
        self.lost = 0
        self.gaps = 0
        self.duplicates = 0
        self.resets = 0
        self.resyncs = 0
        self.overruns = 0
        self.exception_responses = 0
        self.last_read_ts = 0.0
        self._clock = clock

    @property
    def state(self) -> State:
        """``connecting``, then ``online`` (the last read was answered), ``degraded`` (refused
        or malformed) or ``offline`` (transport failed)."""
        return self._state

    @property
    def source(self) -> WaveformSource:
        """The FIFO reader this task runs."""
        return self._source

    def stats(self) -> dict[str, Any]:
        """Counters since construction (a fresh dict).

        ``samples``: delivered; ``lost``: overwritten by the device before they were read;
        ``gaps``: places where samples were lost (each marked by one BAD placeholder);
        ``duplicates``: samples read more than once (reads faster than the device fills the
        FIFO; harmless); ``resets``: the device's counter went back (it restarted);
        ``resyncs``: timestamps re-anchored to the read time (drift over ``max_skew_s``);
        ``overruns``: read deadlines skipped because a read ran late; ``errors``: transport
        failures; ``exception_responses``: refused or malformed blocks; ``rate_hz``: the
        stream's sample rate; ``last_read_ts``: epoch seconds of the last answered read.
        """
        return {
            "channel": self.channel,
            "state": self._state,
            "interval_ms": self.interval_s * 1000.0,
            "phase_ms": self.phase_s * 1000.0,
            "rate_hz": self.rate_hz,
            "reads": self.reads,
            "samples": self.samples,
            "lost": self.lost,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "resets": self.resets,
            "resyncs": self.resyncs,
            "overruns": self.overruns,
            "errors": self.errors,
            "exception_responses": self.exception_responses,
            "reconnects": self.reconnects,
            "last_read_ts": self.last_read_ts,
        }

    async def _connect(self) -> None:
        await self._source.connect()

    async def _session(self) -> None:
        await self._read_until_failure()

    async def _disconnect(self) -> None:
        await self._source.close()

    def _went_down(self, err: DeviceUnavailable) -> None:
        self._set_state("offline", str(err))

    async def _read_until_failure(self) -> None:
        """Read on the deadline grid until the source raises ``DeviceUnavailable``."""
        interval = self.interval_s
        now = self._monotonic()
        if self._grid_t0 is None:  # the grid starts at the first connect
            self._grid_t0 = now
        t0 = self._grid_t0
        deadline = next_deadline(t0, self.phase_s, interval, now)
        while not self._closed:
            delay = deadline - self._monotonic()
            if delay > 0:
                await self._sleep(delay)
            try:
                chunk = await self._source.read()
            except (DeviceException, ValueError) as err:  # ValueError: e.g. a 0 Hz header
                self.exception_responses += 1
                self._set_state("degraded", str(err))
            else:
                self._set_state("online", "")
                self._on_chunk(chunk)
            deadline += interval
            late_s = self._monotonic() - deadline
            if late_s > interval:
                missed = int(late_s // interval)
                self.overruns += missed
                deadline += missed * interval
                log.debug(
                    "device %s: waveform read overran, skipped %d deadlines", self.name, missed
                )

    def _on_chunk(self, chunk: WaveformChunk) -> None:
        """Count the chunk, log gap episodes, and emit its samples as one frame."""
        self.reads += 1
        self.last_read_ts = self._clock()
        n = len(chunk)
        self.duplicates += chunk.duplicates
        if n == 0:
            return
        if n >= 2:  # over the whole chunk: epoch float64 resolves ~0.2 µs, one step is 1 ms
            span = float(chunk.ts[-1] - chunk.ts[0])
            if span > 0:
                self.rate_hz = round((n - 1) / span, 1)
        flags0 = int(chunk.flags[0])
        if chunk.reset:
            self.resets += 1
            log.info("device %s: waveform counter restarted (device reset?)", self.name)
        elif flags0 & FLAG_RESYNC and not self._first_chunk:
            self.resyncs += 1
            log.debug("device %s: waveform timestamps re-anchored to the read time", self.name)
        self._first_chunk = False
        self.samples += n
        now = self._monotonic()
        if chunk.lost and flags0 & FLAG_GAP:
            self._gap(chunk.lost, now)
            self._send(*self._with_placeholder(chunk))
            return
        if self._episode and now - self._last_gap_at >= GAP_QUIET_S:
            self._episode = False
            log.info(
                "device %s: waveform %s continuous again for %.0f s (%d samples lost in %d gaps)",
                self.name,
                self.channel,
                GAP_QUIET_S,
                self._episode_lost,
                self._episode_gaps,
            )
        self._send(chunk.ts, chunk.value, chunk.quality)

    def _gap(self, lost: int, now: float) -> None:
        self.gaps += 1
        self.lost += lost
        self._last_gap_at = now
        if not self._episode:
            self._episode = True
            self._episode_lost = self._episode_gaps = 0
            held_ms = 1000.0 * self.capacity / self.rate_hz if self.rate_hz else float("nan")
            log.warning(
                "device %s: waveform %s lost %d samples (reads every %.0f ms; the FIFO holds "
                "%d samples = %.0f ms at %.0f Hz)",
                self.name,
                self.channel,
                lost,
                self.interval_s * 1000.0,
                self.capacity,
                held_ms,
                self.rate_hz,
            )
        else:
            log.debug("device %s: waveform %s lost %d more samples", self.name, self.channel, lost)
        self._episode_lost += lost
        self._episode_gaps += 1

    def _with_placeholder(
        self, chunk: WaveformChunk
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
        """The chunk with one BAD/NaN sample in front, at the time of the first lost sample."""
        first_lost = float(chunk.ts[0]) - (chunk.lost / self.rate_hz if self.rate_hz else 0.0)
        ts = np.concatenate(([first_lost], chunk.ts))
        value = np.concatenate(([np.nan], chunk.value))
        quality = np.concatenate((np.array([BAD], dtype=np.uint8), chunk.quality))
        return ts, value, quality

    def _send(
        self,
        ts: npt.NDArray[np.float64],
        value: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
    ) -> None:
        n = int(ts.shape[0])
        ids = self._ids[:n] if n <= self._ids.shape[0] else self._full_ids(n)
        self._sink(
            Frame(
                device=self.name,
                channels=self.channels,
                ts=ts,
                channel=ids,
                value=value,
                quality=quality,
            )
        )

    def _full_ids(self, n: int) -> npt.NDArray[np.int32]:
        ids = np.full(n, self._ids[0], dtype=np.int32)
        ids.flags.writeable = False
        return ids

    def _set_state(self, state: State, why: str) -> None:
        """Log a transition once (warning going down, info coming back), debug otherwise."""
        if state == self._state:
            if state != "online":
                log.debug("device %s: waveform still %s: %s", self.name, state, why)
            return
        previous, self._state = self._state, state
        if state == "online":
            if previous == "connecting":
                log.info("device %s: waveform %s online (%s)", self.name, self.channel, self._where)
            else:
                log.info(
                    "device %s: waveform %s online again (%s)", self.name, self.channel, self._where
                )
        else:
            log.warning(
                "device %s: waveform %s %s (%s): %s",
                self.name,
                self.channel,
                state,
                self._where,
                why,
            )
