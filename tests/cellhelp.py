"""Helpers of the tests that run a whole appliance on a simulated cell (real pymodbus servers)
through a real Mosquitto (``tests/e2e``, ``tests/api``, ``tests/uplink``, ``tests/downlink``;
imported as ``cellhelp``: test folders are not packages): the appliance's config document, the
start and stop order, and waiting for a condition.

``overtemp_cell()``: a simulated cell whose second machine overheats for a while.
``cell_doc(id, ports, mqtt_port, **sections)``: the TOML document (a dict) of an appliance that
polls the simulated machines ``cnc-1``... on ``ports``, keeps its outbox in the test's folder
and publishes to the broker on ``mqtt_port`` with quick reconnects; ``sections`` are deep-merged
over it. ``cell_config(tmp_path, ...)``: the same, parsed. ``async with serving(cell, app,
sub)``: starts the simulator, the subscriber, then the appliance, and stops them in the
reverse order (sinks first, sources last). ``await wait_for(cond, timeout_s, what)``: polls.
``with serving_in_background(cell)``: the simulator on an event loop in a thread, for a
blocking CLI under test (``appliance record``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from appliance.config import Config, parse_config
from appliance.demo.mosquitto import free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.simulate.cell import FaultSchedule, SimulatedCell

#: A threshold rule the simulator's ``temp_ramp`` fault raises and its cool-down clears.
OVERTEMP: dict[str, Any] = {
    "name": "spindle_overtemp",
    "channel": "spindle_temp",
    "above": 75.0,
    "clear_below": 65.0,
    "severity": "major",
}


def overtemp_cell() -> tuple[list[int], SimulatedCell]:
    """Two simulated machines on free ports at 3× time (seed 7) whose second (``cnc-2``) has
    its spindle temperature ramp from 3 s to 15 s: an ``OVERTEMP`` rule raises, then clears as
    it cools, within a few wall seconds. Its ports and the cell (not started)."""
    ports = [free_port(), free_port()]
    cell = SimulatedCell(
        machines=2,
        ports=ports,
        seed=7,
        time_scale=3.0,
        faults=[FaultSchedule(machine=1, kind="temp_ramp", at_s=3.0, duration_s=12.0)],
    )
    return ports, cell


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: tables merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def cell_doc(
    appliance_id: str,
    ports: Sequence[int],
    mqtt_port: int,
    *,
    device: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The config document of appliance ``appliance_id``: a ``cnc-sim`` device ``cnc-<i + 1>``
    per port in ``ports`` polled every 100 ms (plus the keys of ``device``), the outbox in
    ``outbox.sqlite``, the broker on ``mqtt_port`` (reconnects from 0.2 s, at most 1 s
    apart); ``sections`` (``alerts={...}``, ``mqtt={...}``, ...) deep-merged over it."""
    doc: dict[str, Any] = {
        "appliance": {"id": appliance_id},
        "devices": [
            {
                "name": f"cnc-{i + 1}",
                "port": p,
                "profile": "cnc-sim",
                "poll_interval_ms": 100,
                **(device or {}),
            }
            for i, p in enumerate(ports)
        ],
        "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL"},
        "mqtt": {"port": mqtt_port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    }
    return deep_merge(doc, copy.deepcopy(sections))


def cell_config(
    base_dir: Path,
    appliance_id: str,
    ports: Sequence[int],
    mqtt_port: int,
    *,
    device: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Config:
    """:func:`cell_doc` parsed, paths relative to ``base_dir`` (errors name ``appliance_id``)."""
    doc = cell_doc(appliance_id, ports, mqtt_port, device=device, **sections)
    return parse_config(doc, source=appliance_id, base_dir=base_dir)


@contextlib.asynccontextmanager
async def serving(
    cell: SimulatedCell,
    app: Appliance,
    sub: DemoSubscriber | None = None,
    *,
    stop_sub: bool = True,
    drain_timeout_s: float = 10.0,
) -> AsyncIterator[None]:
    """Start ``cell``, ``sub`` (when given) and ``app``; on the way out stop ``app`` (draining
    up to ``drain_timeout_s``), ``cell``, and ``sub`` unless ``stop_sub`` is false (a test that
    still reads it after the appliance stopped stops it itself)."""
    await cell.start()
    if sub is not None:
        sub.start()
    await app.start()
    try:
        yield
    finally:
        await app.stop(drain_timeout_s=drain_timeout_s)
        await cell.stop()
        if sub is not None and stop_sub:
            sub.stop()


@contextlib.contextmanager
def serving_in_background(cell: SimulatedCell) -> Iterator[None]:
    """Serve ``cell`` from an event loop in a background thread while the (blocking) CLI
    under test runs in this one; stopped on the way out."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(cell.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(cell.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``cond`` every 50 ms (on the event loop) until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
