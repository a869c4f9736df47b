"""Helpers of the downlink tests (imported as ``dlhelp``: test dirs are not packages), used by
the fixtures of ``conftest.py``: a running appliance with the command channel enabled, against
a simulated cell and a real Mosquitto, and a ``send`` helper.

``downlink_cell``: one such appliance with the default test config (:func:`base_config`).
``downlink_cell_factory(overrides=..., machines=..., protocol=...)``: the same with the config
deep-merged with ``overrides`` (a dict in the TOML document's shape, e.g.
``{"alerts": {"writable": ["feed_hold"]}}``); call it once per test.

The appliance runs on its own event loop in a background thread (the tests stay synchronous):
``cell.call(coro)`` runs a coroutine there and returns its result, ``cell.send(command, body)``
sends a request through the broker and returns the reply as a dict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cellhelp import OVERTEMP, cell_doc

from appliance.demo.mosquitto import MosquittoProcess
from appliance.downlink.client import Broker, send_command
from appliance.downlink.runner import DownlinkRunner
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell

T = TypeVar("T")
APPLIANCE_ID = "dl"
PREFIX = "edge"


def base_config(sim_ports: list[int], mqtt_port: int, protocol: str = "5") -> dict[str, Any]:
    """The TOML document of the test appliance (``dl``): the simulated machines ``cnc-1``...,
    one alert rule, the outbox in the test's folder, downlink enabled."""
    return cell_doc(
        APPLIANCE_ID,
        sim_ports,
        mqtt_port,
        device={"timeout_s": 0.5},
        appliance={"drain_timeout_s": 2.0},
        alerts={"rules": [OVERTEMP]},
        outbox={"path": "state/outbox.sqlite"},
        mqtt={"protocol": protocol},
        downlink={"enabled": True, "apply_deadline_s": 5.0},
    )


@dataclass
class DownlinkCell:
    """A running appliance with its command channel, simulator and broker (module docstring)."""

    runner: DownlinkRunner
    sim: SimulatedCell
    broker: MosquittoProcess
    config_path: Path
    loop: asyncio.AbstractEventLoop
    protocol: str = "5"
    appliance_id: str = APPLIANCE_ID
    prefix: str = PREFIX
    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def app(self) -> Appliance:
        """The pipeline running now (a new object after a ``config.apply``)."""
        return self.runner.appliance

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run ``coro`` on the appliance's event loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def on_loop(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """Call ``fn()`` on the appliance's event loop (to read state safely)."""

        async def run() -> T:
            return fn()

        return self.call(run(), timeout_s)

    def stats(self) -> dict[str, Any]:
        return self.on_loop(self.runner.stats)

    def broker_info(self, protocol: str | None = None) -> Broker:
        return Broker("127.0.0.1", self.broker.port, self.prefix, protocol or self.protocol)

    def send(
        self,
        command: str,
        body: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout_s: float = 30.0,
        protocol: str | None = None,
        payload: bytes | None = None,
    ) -> dict[str, Any]:
        """Send one request through the broker and wait for its reply (a dict)."""
        reply = send_command(
            self.broker_info(protocol),
            self.appliance_id,
            command,
            body,
            request_id=request_id,
            timeout_s=timeout_s,
            payload=payload,
        )
        self.sent.append(reply)
        return reply

    def wait_for(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``cond`` (called on the appliance's loop) until true."""
        deadline = time.monotonic() + timeout_s
        while not self.on_loop(cond):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.05)
