"""Acquisition stage: poll every configured device and emit one columnar ``Frame`` per poll of
one poll group, plus one ``Frame`` per waveform read carrying every new sample of a device's
high-rate FIFO channel.

First stage of the pipeline (``acquire → features → batch → infer → ...``). Start it last and
stop it first (sources after sinks). See :mod:`appliance.acquire.poller` for timing, staggering,
availability and logging behaviour, :mod:`appliance.acquire.waveform` for waveforms and their
gaps, :mod:`appliance.acquire.link` for reconnects and backoff, :mod:`appliance.acquire.driver`
for the driver of each device type, :mod:`appliance.acquire.acquisition` for the stage's tasks.
"""

from appliance.acquire.acquisition import Acquisition
from appliance.acquire.driver import make_driver
from appliance.acquire.link import LinkTask, State
from appliance.acquire.poller import JITTER_WINDOW, STAGGER_SLOT_S, DevicePoller, stagger_phases
from appliance.acquire.waveform import WaveformPoller, WaveformSource
from appliance.contracts import PolledDevice

__all__ = [
    "JITTER_WINDOW",
    "STAGGER_SLOT_S",
    "Acquisition",
    "DevicePoller",
    "LinkTask",
    "PolledDevice",
    "State",
    "WaveformPoller",
    "WaveformSource",
    "make_driver",
    "stagger_phases",
]
