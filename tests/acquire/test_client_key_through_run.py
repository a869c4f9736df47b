"""The device key ``client`` reaches the running appliance: ``appliance run`` (a real process)
polls two simulated machines, one with each Modbus TCP client, and its ``--stats-json`` says
which client each device polled with, both having read values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cellhelp import serving_in_background

from appliance.demo.mosquitto import free_port
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


def test_appliance_run_polls_each_device_with_the_client_its_config_names(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        '[appliance]\nid = "clients"\n'
        + "".join(
            f'[[devices]]\nname = "cnc-{i + 1}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'profile = "cnc-sim"\npoll_interval_ms = 100\nclient = "{client}"\n'
            for i, (port, client) in enumerate(zip(ports, ("native", "pymodbus"), strict=True))
        )
        + f'[outbox]\npath = "{tmp_path / "o.sqlite"}"\n'
        + f"[mqtt]\nport = {free_port()}\n"  # no broker: the outbox keeps what it would send
        + '[engine]\nmodel = ""\n'
    )
    stats = tmp_path / "stats.json"
    with serving_in_background(SimulatedCell(machines=2, ports=ports, seed=3)):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "run",
                "-c",
                str(cfg),
                "--duration",
                "3",
                "--stats-json",
                str(stats),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    devices = {d["device"]: d for d in json.loads(stats.read_text())["acquisition"]}
    assert devices["cnc-1"]["client"] == "native"
    assert devices["cnc-2"]["client"] == "pymodbus"
    for d in devices.values():
        assert d["polls"] >= 10 and d["errors"] == 0, d
