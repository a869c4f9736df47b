"""Acquisition stage: poll every configured device and emit one columnar ``Frame`` per poll of
one poll group, plus one ``Frame`` per waveform read carrying every new sample of a device's
high-rate FIFO channel.

First stage of the pipeline (``acquire → features → batch → infer → ...``). Start it last and
stop it first (sources after sinks). See :mod:`appliance.acquire.poller` for timing, staggering,
backoff and logging behaviour, :mod:`appliance.acquire.waveform` for waveforms and their gaps.
"""

from appliance.acquire.poller import (
    JITTER_WINDOW,
    STAGGER_SLOT_S,
    Acquisition,
    DevicePoller,
    State,
    make_driver,
    stagger_phases,
)
from appliance.acquire.waveform import WaveformPoller, WaveformSource
from appliance.contracts import PolledDevice

__all__ = [
    "JITTER_WINDOW",
    "STAGGER_SLOT_S",
    "Acquisition",
    "DevicePoller",
    "PolledDevice",
    "State",
    "WaveformPoller",
    "WaveformSource",
    "make_driver",
    "stagger_phases",
]
