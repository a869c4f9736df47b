"""Shared fixtures of the downlink tests (issue 16): ``downlink_cell`` and
``downlink_cell_factory`` (see ``dlhelp.py`` for :class:`DownlinkCell` and its ``send``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cellhelp import deep_merge
from dlhelp import DownlinkCell, base_config

from appliance.config import load_config
from appliance.demo.mosquitto import MosquittoProcess, free_port, wait_port
from appliance.downlink.runner import DownlinkRunner
from appliance.downlink.tomlfile import dumps
from appliance.simulate.cell import SimulatedCell

# Test modules elsewhere do `from conftest import free_port, wait_port, Mosquitto` (the names of
# tests/conftest.py). Test folders are not packages, so once this file is loaded it may be the
# module named `conftest` that such an import finds: it offers the same names.
Mosquitto = MosquittoProcess
__all__ = ["Mosquitto", "free_port", "wait_port"]


@pytest.fixture
def downlink_cell_factory(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> Iterator[Callable[..., DownlinkCell]]:
    """``start(overrides=None, machines=1, protocol="5", sim_kwargs=None) -> DownlinkCell``;
    everything it started is stopped after the test."""
    started: list[tuple[DownlinkCell, threading.Thread]] = []

    def start(
        overrides: dict[str, Any] | None = None,
        machines: int = 1,
        protocol: str = "5",
        sim_kwargs: dict[str, Any] | None = None,
    ) -> DownlinkCell:
        ports = [free_port() for _ in range(machines)]
        doc = deep_merge(base_config(ports, mosquitto.port, protocol), overrides or {})
        path = tmp_path / "appliance.toml"
        path.write_text(dumps(doc), encoding="utf-8")
        cfg = load_config(path)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="downlink-cell", daemon=True)
        thread.start()
        sim = SimulatedCell(machines=machines, ports=ports, seed=5, **(sim_kwargs or {}))
        runner = DownlinkRunner(cfg, path)
        cell = DownlinkCell(runner, sim, mosquitto, path, loop, protocol)
        started.append((cell, thread))
        cell.call(sim.start())
        cell.call(runner.start())
        channel = runner.channel
        assert channel is not None
        cell.wait_for(
            lambda: channel.subscribed.is_set() and runner.appliance.uplink.connected,
            20,
            "the command channel subscribed and the uplink connected",
        )
        return cell

    yield start
    for cell, thread in started:
        try:
            cell.call(cell.runner.stop())
            cell.call(cell.sim.stop())
        finally:
            cell.loop.call_soon_threadsafe(cell.loop.stop)
            thread.join(10)
            cell.loop.close()


@pytest.fixture
def downlink_cell(downlink_cell_factory: Callable[..., DownlinkCell]) -> DownlinkCell:
    """A running appliance (``dl``, one simulated machine ``cnc-1``, MQTT 5) with the command
    channel enabled; ``downlink_cell.send(command, body) -> reply``."""
    return downlink_cell_factory()
