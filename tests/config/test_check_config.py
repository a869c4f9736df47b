"""`appliance check-config` refuses what `appliance run` refuses or would misread (issue 9,
defect 3): exit 2 naming the key; warnings on stderr keep exit 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.runtime import Appliance

DEVICE = '[[devices]]\nname = "press-1"\nprofile = "cnc-sim"\n'


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "cell.toml"
    path.write_text(text)
    rc = main(["check-config", str(path)])
    return rc, capsys.readouterr().err


def test_a_model_that_does_not_exist_is_refused_naming_engine_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = check(tmp_path, DEVICE + '[engine]\nmodel = "no_such_model"\n', capsys)
    assert rc == 2
    assert "engine.model" in err and "no_such_model" in err and "cell.toml" in err


def test_a_window_the_model_was_not_trained_on_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = check(tmp_path, DEVICE + "[features]\nwindow_s = 2.5\n", capsys)
    assert rc == 2 and "features.window_s = 2.5" in err and "trained on 1.0 s" in err


def test_run_refuses_the_same_model_problems_with_the_same_message(tmp_path: Path) -> None:
    path = tmp_path / "cell.toml"
    path.write_text(DEVICE + "[features]\nwindow_s = 2.5\n")
    with pytest.raises(ConfigError, match=r"features\.window_s = 2\.5"):
        Appliance(load_config(path))


def regs(*entries: tuple[str, int, str]) -> str:
    return '[[devices]]\nname = "press-1"\n' + "".join(
        f'[[devices.registers]]\nname = "{n}"\naddress = {a}\n{extra}\n' for n, a, extra in entries
    )


def test_overlapping_registers_are_refused_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = regs(("speed", 0, ""), ("power", 4, 'type = "float32"'), ("oil_temp", 5, ""))
    rc, err = check(tmp_path, text, capsys)
    assert rc == 2
    assert "devices[0] (press-1).registers[2] (oil_temp).address: holding 5 overlaps" in err
    assert "devices[0] (press-1).registers[1] (power) at 4-5" in err


def test_the_same_address_in_another_table_is_no_overlap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = regs(("power", 4, 'type = "float32"'), ("oil_temp", 5, 'table = "input"'))
    assert check(tmp_path, text, capsys)[0] == 0


def test_bits_of_one_register_are_no_overlap_but_the_same_bit_twice_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bits = regs(
        ("status", 7, ""),
        ("door_open", 7, 'type = "bit"\nbit = 0'),
        ("estop", 7, 'type = "bit"\nbit = 1'),
    )
    assert check(tmp_path, bits, capsys)[0] == 0
    twice = bits + '[[devices.registers]]\nname = "estop2"\naddress = 7\ntype = "bit"\nbit = 1\n'
    rc, err = check(tmp_path, twice, capsys)
    assert rc == 2 and "registers[3] (estop2).bit: bit 1 of holding register 7" in err
    assert "registers[2] (estop)" in err


def test_two_devices_on_the_same_host_port_and_unit_get_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        DEVICE
        + 'host = "10.0.0.5"\n'
        + '[[devices]]\nname = "press-2"\nprofile = "cnc-sim"\nhost = "10.0.0.5"\n'
    )
    rc, err = check(tmp_path, text, capsys)
    assert rc == 0
    assert "warning" in err and "devices[1] (press-2)" in err and "devices[0] (press-1)" in err
    other = text.replace(
        'host = "10.0.0.5"\n[[devices]]', 'host = "10.0.0.5"\nunit_id = 2\n[[devices]]'
    )
    assert check(tmp_path, other, capsys) == (0, "")


def test_engine_model_needing_channels_a_device_lacks_is_named_in_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The implicit engine.model serves every machine; one without its channels would never
    be scored, silently. check-config names the device and lists the missing channels (a
    [[models]] model is refused for that: tests/config/test_models_section.py)."""
    text = (
        DEVICE
        + '[[devices]]\nname = "press-2"\nport = 503\n'
        + '[[devices.registers]]\nname = "spindle_temp"\naddress = 0\n'
    )
    rc, err = check(tmp_path, text, capsys)
    assert rc == 0
    assert "warning" in err and "engine.model: model cnc_anomaly" in err
    assert "devices[1] (press-2) does not have: axis_load_x, axis_load_y" in err
    assert "devices[0]" not in err
