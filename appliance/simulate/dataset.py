"""Offline simulated data: the frames an appliance would acquire from one simulated machine.

No servers, no clock: a :class:`~appliance.simulate.machine.CncMachine` and its
:class:`~appliance.simulate.fifo.VibrationFifo` are stepped every ``poll_s`` and each step becomes
one :class:`~appliance.contracts.Frame` holding the scalar channels (one value each, at the poll
time) and the waveform samples produced since the last poll (per-sample times), all under one
channel tuple, as the appliance's acquisition delivers a device with a waveform. The training
scripts in ``models/``, ``models/thresholds.py`` and the tests build windows and features from
these frames with the appliance's own code, so training and serving compute the same features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from appliance.contracts import Frame, Quality
from appliance.simulate.fifo import SCALE_U, VibrationFifo
from appliance.simulate.machine import CHANNELS as MACHINE_CHANNELS
from appliance.simulate.machine import CncMachine

#: Scalar channels (the ``cnc-sim`` profile's continuous registers and the two counters).
SCALAR_CHANNELS: tuple[str, ...] = MACHINE_CHANNELS
#: Name of the vibration waveform channel (``[devices.waveform] channel`` in the configs).
WAVE_CHANNEL = "vibration_wave"
#: Epoch of simulated time 0 (s): an arbitrary wall-clock time, a multiple of every window.
EPOCH_S = 1.7e9


@dataclass(frozen=True)
class FaultEvent:
    """Fault ``kind`` injected ``at_s`` simulated seconds after start, for ``duration_s``."""

    at_s: float
    kind: str
    duration_s: float


def simulate_frames(
    seed: int,
    index: int,
    seconds: float,
    faults: Sequence[FaultEvent] = (),
    *,
    poll_s: float = 0.1,
    wave_rate_hz: int = 1000,
    waveform: bool = True,
    device: str = "m",
) -> Iterator[Frame]:
    """Frames of machine ``index`` of cell ``seed`` over ``seconds`` simulated seconds.

    Timestamps are ``EPOCH_S`` + simulated time. With ``waveform`` the channel tuple ends with
    :data:`WAVE_CHANNEL` (samples quantised to the FIFO's counts, as a client reads them).
    """
    machine = CncMachine(seed=seed, index=index)
    fifo = VibrationFifo(seed * 1000 + index, wave_rate_hz)
    channels = SCALAR_CHANNELS + ((WAVE_CHANNEL,) if waveform else ())
    n_scalar = len(SCALAR_CHANNELS)
    scalar_idx = np.arange(n_scalar, dtype=np.int32)
    pending = sorted(faults, key=lambda f: f.at_s)
    t = 0.0
    for _ in range(int(round(seconds / poll_s))):
        machine.step(poll_s)
        t += poll_s
        while pending and pending[0].at_s <= t:
            ev = pending.pop(0)
            machine.inject(ev.kind, ev.duration_s)
        vals = machine.values()
        scalar = np.array([vals[c] for c in SCALAR_CHANNELS], dtype=np.float64)
        ts = np.full(n_scalar, EPOCH_S + t)
        ch = scalar_idx
        value = scalar
        if waveform:
            before = fifo.next_seq
            n = fifo.advance(
                poll_s, vals["vibration_rms"], vals["spindle_speed"], machine.waveform_tones()
            )
            if n:
                wave = fifo.samples()[-n:].astype(np.float64) * (SCALE_U * 1e-6)
                seq = np.arange(before, before + n, dtype=np.float64)
                wts = EPOCH_S + (seq + 1.0) / wave_rate_hz
                ts = np.concatenate([wts, ts])
                ch = np.concatenate([np.full(n, n_scalar, np.int32), scalar_idx])
                value = np.concatenate([wave, scalar])
        yield Frame(
            device=device,
            channels=channels,
            ts=ts,
            channel=ch,
            value=value,
            quality=np.full(ts.shape[0], Quality.GOOD, np.uint8),
        )


def fault_active(t_rel_s: np.ndarray, faults: Sequence[FaultEvent]) -> np.ndarray:
    """Boolean per time (simulated seconds since start): inside any fault's interval."""
    out = np.zeros(t_rel_s.shape, dtype=bool)
    for f in faults:
        out |= (t_rel_s >= f.at_s) & (t_rel_s < f.at_s + f.duration_s)
    return out
