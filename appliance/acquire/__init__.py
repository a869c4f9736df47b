"""Acquisition stage: poll every configured device and emit one columnar ``Frame`` per poll.

First stage of the pipeline (``acquire → features → batch → infer → ...``). Start it last and
stop it first (sources after sinks). See :mod:`appliance.acquire.poller` for timing, backoff
and logging behaviour.
"""

from appliance.acquire.poller import Acquisition, DevicePoller, PolledDevice, make_driver

__all__ = ["Acquisition", "DevicePoller", "PolledDevice", "make_driver"]
