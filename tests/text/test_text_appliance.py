"""Text-protocol devices inside the appliance: config loading (and the samples in
docs/drivers-text.md), ``make_driver`` and a ``DevicePoller`` emitting frames from the
simulators over TCP and a real socat pty pair."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
from texthelp import socat_pair, wait_until

from appliance.acquire import DevicePoller, make_driver
from appliance.config import HaasConfig, LineConfig, load_config, parse_config
from appliance.contracts import Frame, Quality
from appliance.errors import ConfigError
from appliance.simulate.haas import HaasResponder, HaasSimulator
from appliance.simulate.machine import CncMachine
from appliance.simulate.textstream import LineStreamer, StreamSimulator
from drivers.text.haas import HaasDevice
from drivers.text.line import LineDevice

DOC = Path(__file__).resolve().parents[2] / "docs" / "drivers-text.md"

CELL = """
[[devices]]
name = "vf2-1"
protocol = "haas_q"
host = "127.0.0.1"
port = {haas_port}
poll_interval_ms = 50
timeout_s = 2.0

[[devices.variables]]
name = "spindle_speed"
var = 3027

[[devices.variables]]
name = "spindle_temp"
var = 101

[[devices]]
name = "probe-1"
protocol = "line"
serial_port = "{pty}"
baudrate = 115200
poll_interval_ms = 50
format = "kv"

[[devices.channels]]
name = "coolant"
key = "coolant_temp"

[[alerts.rules]]
name = "hot-spindle"
channel = "spindle_temp"
above = 75.0

[[alerts.rules]]
name = "hot-coolant"
channel = "coolant"
above = 40.0
"""


def doc_samples() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_docs_show_a_sample_for_each_text_protocol() -> None:
    protocols = [re.search(r'protocol = "(\w+)"', s) for s in doc_samples()]
    assert {m.group(1) for m in protocols if m} == {"haas_q", "line"}


@pytest.mark.parametrize("sample", doc_samples(), ids=lambda s: s.split('"')[1])
def test_every_sample_config_in_the_docs_loads(sample: str, tmp_path: Path) -> None:
    path = tmp_path / "sample.toml"
    path.write_text(sample, encoding="utf-8")
    cfg = load_config(path)
    (device,) = cfg.devices
    assert isinstance(device, HaasConfig | LineConfig)
    driver = make_driver(device)
    assert driver.channels == tuple(r.name for r in device.registers)  # type: ignore[attr-defined]


def test_a_cell_config_with_haas_and_line_devices_loads_and_builds_drivers(tmp_path: Path) -> None:
    path = tmp_path / "cell.toml"
    path.write_text(CELL.format(haas_port=5051, pty="/dev/ttyUSB0"), encoding="utf-8")
    cfg = load_config(path)
    haas, line = cfg.devices
    assert isinstance(haas, HaasConfig) and isinstance(line, LineConfig)
    assert [r.name for r in haas.registers] == [
        "spindle_speed",
        "spindle_temp",
        "parts_count",
        "running",
    ]
    assert [r.name for r in line.registers] == ["coolant"]
    assert isinstance(make_driver(haas), HaasDevice)
    assert isinstance(make_driver(line), LineDevice)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ({"host": "h", "serial_port": "/dev/x", "variables": []}, "exactly one of"),
        ({"variables": []}, "exactly one of"),
        ({"host": "h", "parts_channel": "", "running_channel": ""}, "no channels"),
        ({"host": "h", "variables": [{"name": "running", "var": 1}]}, "duplicate channel"),
        ({"host": "h", "stopbits": 3}, "stopbits"),
        (
            {"host": "h", "variables": [{"name": "9bad", "var": 1}]},
            "devices[0] (m).variables[0] (9bad).name",
        ),
        (
            {"host": "h", "variables": [{"name": "s", "var": 0}]},
            "devices[0] (m).variables[0] (s).var",
        ),
        ({"host": "h", "parity": "X"}, "parity"),
    ],
)
def test_invalid_haas_configs_name_the_device_and_key(
    device: dict[str, object], message: str
) -> None:
    data = {"devices": [{"name": "m", "protocol": "haas_q", **device}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="cell.toml", base_dir=Path("."))
    assert message in str(err.value)
    assert "cell.toml" in str(err.value) and "devices[0]" in str(err.value)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ({"channels": [{"name": "a"}]}, "needs `columns`"),
        ({"columns": ["a"], "channels": [{"name": "b"}]}, "not one of columns"),
        ({"format": "kv", "columns": ["a"], "channels": [{"name": "a"}]}, "csv' only"),
        ({"format": "kv"}, "no channels"),
        ({"format": "xml", "channels": [{"name": "a"}]}, "format"),
        ({"format": "kv", "channels": [{"name": "a"}], "separator": ""}, "separator"),
    ],
)
def test_invalid_line_configs_name_the_device_and_key(
    device: dict[str, object], message: str
) -> None:
    data = {"devices": [{"name": "s", "protocol": "line", "host": "h", **device}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="cell.toml", base_dir=Path("."))
    assert message in str(err.value)
    assert "devices[0]" in str(err.value)


def test_alert_rules_must_name_a_channel_of_a_text_device() -> None:
    data = {
        "devices": [{"name": "m", "protocol": "haas_q", "host": "h"}],
        "alerts": {"rules": [{"name": "r", "channel": "nope", "above": 1.0}]},
    }
    with pytest.raises(ConfigError, match="'nope'.*known: \\['parts_count', 'running'\\]"):
        parse_config(data, base_dir=Path("."))


@pytest.mark.pty
def test_device_pollers_emit_frames_from_a_haas_control_and_a_line_sensor(tmp_path: Path) -> None:
    frames: list[Frame] = []

    async def main(a: str, b: str) -> None:
        haas_machine, line_machine = CncMachine(seed=11), CncMachine(seed=12, index=1)
        haas_sim = HaasSimulator(HaasResponder(haas_machine), monotonic=lambda: 0.0)
        haas_port = await haas_sim.serve_tcp()
        stream = StreamSimulator(
            LineStreamer(line_machine, fmt="kv", channels=("coolant_temp",)), rate_hz=100.0
        )
        await stream.serve_serial(a, baudrate=115200)
        path = tmp_path / "cell.toml"
        path.write_text(CELL.format(haas_port=haas_port, pty=b), encoding="utf-8")
        cfg = load_config(path)
        pollers = [DevicePoller(d, frames.append) for d in cfg.devices]
        tasks = [asyncio.create_task(p.run()) for p in pollers]
        await stream.start()
        try:
            await wait_until(
                lambda: (
                    {f.device for f in frames if (f.quality == Quality.GOOD).all()}
                    == {"vf2-1", "probe-1"}
                ),
                timeout_s=4.0,
            )
        finally:
            for p in pollers:
                await p.close()
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            await stream.stop()
            await haas_sim.stop()
        assert all(p.state == "online" for p in pollers)
        haas = next(f for f in frames if f.device == "vf2-1" and (f.quality == 0).all())
        assert haas.channels == ("spindle_speed", "spindle_temp", "parts_count", "running")
        values = dict(zip(haas.channels, haas.value, strict=True))
        want = haas_machine.values()
        assert math.isclose(values["spindle_temp"], want["spindle_temp"], abs_tol=1e-5)
        assert values["parts_count"] == want["part_counter"]
        probe = next(f for f in frames if f.device == "probe-1" and (f.quality == 0).all())
        assert probe.channels == ("coolant",)
        assert 15.0 < probe.value[0] < 35.0

    with socat_pair(tmp_path) as (a, b):
        asyncio.run(main(a, b))
