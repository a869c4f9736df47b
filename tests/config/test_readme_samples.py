"""Every driver sample in the README's Drivers section is a valid config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from appliance.config import parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

README = Path(__file__).resolve().parents[2] / "README.md"


def samples() -> list[str]:
    section = README.read_text().split("## Drivers", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```toml\n(.*?)```", section, re.S)


def test_the_readme_has_a_sample_for_every_protocol() -> None:
    protocols = set()
    for text in samples():
        for dev in tomllib.loads(text)["devices"]:
            protocols.add(dev.get("protocol", "modbus_tcp"))
    assert protocols == {"modbus_tcp", "modbus_rtu", "haas_q", "line"}


@pytest.mark.parametrize("text", samples(), ids=lambda t: t.split('name = "')[1].split('"')[0])
def test_readme_driver_sample_loads(text: str, tmp_path: Path) -> None:
    cfg = parse_config(tomllib.loads(text), source="README.md", base_dir=tmp_path)
    assert cfg.devices
