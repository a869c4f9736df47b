"""Config loading: the shipped sample loads; bad files fail with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "image" / "config" / "appliance.toml"


def test_shipped_sample_config_loads_with_profile_resolved() -> None:
    cfg = load_config(SAMPLE)
    assert [d.name for d in cfg.devices] == ["cnc-1", "cnc-2"]
    assert len(cfg.devices[0].registers) == 10  # from drivers/profiles/cnc-sim.toml
    assert cfg.devices[1].registers[5].name == "spindle_temp"
    assert cfg.outbox.path == "/var/lib/appliance/outbox.sqlite"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


DEVICE = '[[devices]]\nname = "m"\nprofile = "cnc-sim"\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '[[devices]]\nname = "m"\n[[devices.registers]]\nname = "t"\naddress = 5\n'
            'type = "flaot32"\n',
            "devices[0] (m).registers[0] (t).type: Invalid enum value 'flaot32'",
        ),
        (DEVICE + "poll_interval_ms = -100\n", "devices[0] (m).poll_interval_ms: Expected `int`"),
        (DEVICE + "colour = 3\n", "devices[0] (m): Object contains unknown field `colour`"),
        (
            DEVICE + 'client = "libmodbus"\n',
            "devices[0] (m).client: Invalid enum value 'libmodbus'",
        ),
        (
            DEVICE + '[[alerts.rules]]\nname = "x"\nchannel = "spindle_tmp"\nabove = 1\n',
            "alerts.rules[0] (x).channel: 'spindle_tmp' is not a numeric channel",
        ),
        (DEVICE + DEVICE, "devices[1] (m).name: duplicate device name 'm'"),
        ('[[devices]]\nname = "m"\nprofile = "nope"\n', "devices[0] (m).profile: profile 'nope'"),
        ("[mqtt]\nport = 70000\n", "mqtt.port: Expected `int` <= 65535"),
        ("[mqtt\nport = 1", "not valid TOML"),
    ],
)
def test_invalid_config_names_file_and_key_path(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_check_config_exits_2_naming_the_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, DEVICE + "poll_interval_ms = -1\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "devices[0] (m).poll_interval_ms" in err and str(path) in err


def test_check_config_accepts_the_sample(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(SAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_relative_outbox_path_resolves_against_the_config_directory(tmp_path: Path) -> None:
    path = write(tmp_path, DEVICE + '[outbox]\npath = "data/outbox.sqlite"\n')
    assert load_config(path).outbox.path == str(tmp_path / "data" / "outbox.sqlite")


def test_an_alert_rule_on_a_string_register_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[devices]]\nname = "m"\n[[devices.registers]]\nname = "serial_no"\naddress = 0\n'
        'type = "string"\nlength = 8\n[[devices.registers]]\nname = "t"\naddress = 4\n'
        '[[alerts.rules]]\nname = "x"\nchannel = "serial_no"\nabove = 1\n',
    )
    with pytest.raises(ConfigError, match="'serial_no' is not a numeric channel"):
        load_config(path)


def test_errors_name_devices_and_registers_by_name_as_well_as_index(tmp_path: Path) -> None:
    regs = "".join(f'[[devices.registers]]\nname = "r{i}"\naddress = {i}\n' for i in range(7))
    path = write(
        tmp_path,
        DEVICE
        + DEVICE.replace('"m"', '"m2"')
        + '[[devices]]\nname = "press-1"\n'
        + regs
        + '[[devices.registers]]\nname = "oil_temp"\naddress = 9\ntype = "flaot32"\n',
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}: devices[2] (press-1).registers[7] (oil_temp).type: Invalid enum value 'flaot32'"
    )


def test_errors_in_a_profile_name_the_profile_and_the_register(tmp_path: Path) -> None:
    (tmp_path / "press.toml").write_text(
        '[[registers]]\nname = "a"\naddress = 0\n'
        '[[registers]]\nname = "oil_temp"\naddress = 1\nscale = "x"\n'
    )
    path = write(tmp_path, '[[devices]]\nname = "press-1"\nprofile = "press.toml"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "devices[0] (press-1).profile: profile " in str(exc.value)
    assert "registers[1] (oil_temp).scale: Expected `float`, got `str`" in str(exc.value)
