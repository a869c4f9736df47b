"""Acquisition stage: poll every configured device and emit one columnar ``Frame`` per poll of
one poll group.

First stage of the pipeline (``acquire → features → batch → infer → ...``). Start it last and
stop it first (sources after sinks). See :mod:`appliance.acquire.poller` for timing, backoff
and logging behaviour.
"""

from appliance.acquire.poller import (
    JITTER_WINDOW,
    Acquisition,
    DevicePoller,
    PolledDevice,
    State,
    make_driver,
)

__all__ = ["JITTER_WINDOW", "Acquisition", "DevicePoller", "PolledDevice", "State", "make_driver"]
