"""The simulated machine's vibration sample FIFO (pure, deterministic; no I/O, no clock).

A spindle accelerometer's velocity signal sampled at :data:`DEFAULT_RATE_HZ` of *simulated*
time: a fundamental at the spindle's rotation frequency (rpm / 60 Hz) plus its second and third
harmonics and broadband noise, scaled so that the signal's RMS follows the machine's
``vibration_rms`` channel (mm/s). Samples are int16 counts of :data:`SCALE_U` millionths of a
mm/s (1 count = 0.001 mm/s, full scale ±32.767 mm/s; larger values saturate).

:meth:`VibrationFifo.registers` is the register block of
:mod:`drivers.modbus.waveform` (header + the newest ``capacity`` samples), which the cell writes
into the input registers at ``fifo_address`` after every tick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from drivers.modbus.waveform import MAX_CAPACITY, encode_block

#: Sample rate (Hz of simulated time).
DEFAULT_RATE_HZ = 1000
#: Samples in the served block (the whole block is one 125-register read).
DEFAULT_CAPACITY = MAX_CAPACITY
#: Engineering units (mm/s) per count, in millionths.
SCALE_U = 1000

# Relative amplitudes of the fundamental and the 2nd and 3rd harmonics, and the noise share.
_HARMONICS = (1.0, 0.5, 0.25)
_NOISE = 0.3
_POWER = sum(a * a for a in _HARMONICS) / 2.0 + _NOISE * _NOISE


class VibrationFifo:
    """Produces samples as simulated time advances and serves the newest ``capacity``.

    ``seed`` feeds the noise stream (``numpy.random.default_rng``), so the same seed and the
    same :meth:`advance` calls give the same samples. ``start_seq`` is the sequence number of
    the first sample (tests start near 2**32 to exercise wrap-around).
    """

    def __init__(
        self,
        seed: int = 0,
        rate_hz: int = DEFAULT_RATE_HZ,
        capacity: int = DEFAULT_CAPACITY,
        *,
        start_seq: int = 0,
    ) -> None:
        if not 1 <= rate_hz <= 65535:
            raise ValueError(f"rate_hz must be in 1..65535, got {rate_hz}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {capacity}")
        self.rate_hz = rate_hz
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._ring = np.zeros(capacity, dtype=np.int16)
        self._filled = 0
        self._next_seq = start_seq  # sequence number of the next sample produced
        self._phase = 0.0  # radians of the fundamental
        self._carry_s = 0.0  # simulated time not yet turned into a sample
        self._tone_phase: dict[str, float] = {}  # radians of each fault tone, by key

    @property
    def next_seq(self) -> int:
        """Sequence number the next sample will get (samples produced so far + ``start_seq``)."""
        return self._next_seq

    def advance(
        self,
        dt_s: float,
        rms_mm_s: float,
        speed_rpm: float,
        tones: Sequence[tuple[str, float, float]] = (),
    ) -> int:
        """Produce the samples of ``dt_s`` simulated seconds; return how many.

        ``tones`` are fault components ``(key, frequency_hz, rms_mm_s)``
        (:meth:`~appliance.simulate.machine.CncMachine.waveform_tones`): their power is part of
        ``rms_mm_s``, so the healthy signal gets what remains and the total RMS follows
        ``rms_mm_s``; each key's phase continues from one call to the next."""
        self._carry_s += dt_s
        n = int(self._carry_s * self.rate_hz)
        if n <= 0:
            return 0
        self._carry_s -= n / self.rate_hz
        w = 2.0 * math.pi * max(speed_rpm, 0.0) / 60.0 / self.rate_hz
        phase = self._phase + w * np.arange(1, n + 1, dtype=np.float64)
        self._phase = float(phase[-1] % (2.0 * math.pi))
        sig = sum(a * np.sin(k * phase) for k, a in enumerate(_HARMONICS, start=1))
        sig = sig + _NOISE * self._rng.standard_normal(n)
        base_rms = math.sqrt(max(rms_mm_s * rms_mm_s - sum(a * a for _, _, a in tones), 0.0))
        sig = sig * (base_rms / math.sqrt(_POWER))
        steps = np.arange(1, n + 1, dtype=np.float64)
        for key, freq_hz, tone_rms in tones:
            tw = 2.0 * math.pi * freq_hz / self.rate_hz
            tphase = self._tone_phase.get(key, 0.0) + tw * steps
            self._tone_phase[key] = float(tphase[-1] % (2.0 * math.pi))
            sig = sig + math.sqrt(2.0) * tone_rms * np.sin(tphase)
        counts = np.clip(np.rint(sig * 1e6 / SCALE_U), -32768, 32767).astype(np.int16)
        self._push(counts)
        self._next_seq += n
        return n

    def samples(self) -> npt.NDArray[np.int16]:
        """The valid samples of the block, oldest first (a copy)."""
        out: npt.NDArray[np.int16] = self._ring[self.capacity - self._filled :].copy()
        return out

    def registers(self) -> list[int]:
        """The register block: header and the newest samples (see the module docstring)."""
        return encode_block(
            self._next_seq - self._filled, self.samples(), self.capacity, self.rate_hz, SCALE_U
        )

    def _push(self, counts: npt.NDArray[np.int16]) -> None:
        k = counts.shape[0]
        if k >= self.capacity:
            self._ring[:] = counts[-self.capacity :]
        else:
            self._ring[:-k] = self._ring[k:]
            self._ring[-k:] = counts
        self._filled = min(self.capacity, self._filled + k)
