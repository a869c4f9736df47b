"""Device-level `order` and `type` that registers inherit; orders in any letter case."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError


def load(tmp_path: Path, text: str) -> list[tuple[str, str, str]]:
    path = tmp_path / "cell.toml"
    path.write_text(text)
    return [(r.name, r.type, r.order) for r in load_config(path).devices[0].registers]


def test_registers_inherit_the_device_order_and_type_unless_they_set_their_own(
    tmp_path: Path,
) -> None:
    regs = load(
        tmp_path,
        '[[devices]]\nname = "press-1"\norder = "cdab"\ntype = "float32"\n'
        '[[devices.registers]]\nname = "oil_temp"\naddress = 0\n'
        '[[devices.registers]]\nname = "strokes"\naddress = 2\ntype = "uint32"\n'
        '[[devices.registers]]\nname = "power"\naddress = 4\norder = "dcba"\n'
        '[[devices.registers]]\nname = "door"\naddress = 0\ntable = "coil"\ntype = "bool"\n',
    )
    assert regs == [
        ("oil_temp", "float32", "CDAB"),
        ("strokes", "uint32", "CDAB"),
        ("power", "float32", "DCBA"),
        ("door", "bool", "CDAB"),
    ]


def test_without_device_defaults_registers_keep_the_documented_defaults(tmp_path: Path) -> None:
    regs = load(
        tmp_path, '[[devices]]\nname = "m"\n[[devices.registers]]\nname = "t"\naddress = 0\n'
    )
    assert regs == [("t", "uint16", "ABCD")]


def test_profile_registers_inherit_the_device_order(tmp_path: Path) -> None:
    (tmp_path / "vfd.toml").write_text(
        '[[registers]]\nname = "freq"\naddress = 0\n'
        '[[registers]]\nname = "volts"\naddress = 2\ntype = "uint16"\norder = "ABCD"\n'
    )
    regs = load(
        tmp_path,
        '[[devices]]\nname = "vfd"\nprofile = "vfd.toml"\norder = "badc"\ntype = "int32"\n',
    )
    assert regs == [("freq", "int32", "BADC"), ("volts", "uint16", "ABCD")]


def test_a_register_order_in_lower_case_is_accepted(tmp_path: Path) -> None:
    regs = load(
        tmp_path,
        '[[devices]]\nname = "m"\n[[devices.registers]]\nname = "t"\naddress = 0\n'
        'type = "float32"\norder = "cdab"\n',
    )
    assert regs == [("t", "float32", "CDAB")]


def test_an_unknown_device_order_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"devices\[0\] \(m\).order: Invalid enum value 'XYZW'"):
        load(tmp_path, '[[devices]]\nname = "m"\norder = "xyzw"\nprofile = "cnc-sim"\n')


def test_the_documented_device_defaults_sample_loads_as_described(tmp_path: Path) -> None:
    import re

    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    (sample,) = [b for b in re.findall(r"```toml\n(.*?)```", docs, re.S) if "cdab" in b]
    assert load(tmp_path, sample) == [
        ("oil_temp", "float32", "CDAB"),
        ("strokes", "uint32", "CDAB"),
        ("mode", "uint16", "CDAB"),
    ]
