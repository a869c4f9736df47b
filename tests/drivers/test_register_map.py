"""Register maps: unit conversions (drivers.units), poll groups, string registers and the
config-load validation of Modbus devices (errors name the device and the key path)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ModbusRtuConfig, ModbusTcpConfig, parse_config
from appliance.errors import ConfigError
from drivers import units
from drivers.modbus import codec
from drivers.modbus.plan import Decoder, plan_reads
from drivers.modbus.registers import Register

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param("degF->degC", 212.0, 100.0, id="boiling water"),
        pytest.param("degF->degC", -40.0, -40.0, id="where the scales meet"),
        pytest.param("degC->degF", 37.0, 98.6, id="body temperature"),
        pytest.param("K->degC", 273.15, 0.0, id="freezing point"),
        pytest.param("bar->Pa", 1.5, 150000.0, id="bar"),
        pytest.param("psi->kPa", 14.6959, 101.325, id="one atmosphere"),
        pytest.param("psi->bar", 14.5038, 1.0, id="psi to bar"),
        pytest.param("inch->mm", 2.0, 50.8, id="inch"),
        pytest.param("in/s->mm/s", 0.1, 2.54, id="vibration velocity"),
        pytest.param("g->m/s2", 1.0, 9.80665, id="standard gravity"),
        pytest.param("rpm->Hz", 1200.0, 20.0, id="rpm"),
        pytest.param("gal/min->l/min", 1.0, 3.785411784, id="US gallons"),
        pytest.param("", 7.0, 7.0, id="no conversion"),
    ],
)
def test_unit_conversions_match_reference_values(name: str, value: float, expected: float) -> None:
    assert units.convert(value, name) == pytest.approx(expected, rel=1e-5)


def test_an_unknown_conversion_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(units.UnknownConversion, match=r"'furlong->m'.*degF->degC"):
        units.conversion("furlong->m")


def test_conversion_applies_after_scale_and_offset_in_the_columnar_decoder() -> None:
    registers = [
        Register(name="t", address=0, type="int16", scale=0.1, offset=10.0, convert="degF->degC"),
        Register(name="p", address=1, type="float32", convert="psi->kPa"),
    ]
    words = codec.encode(1020, "int16") + codec.encode(100.0, "float32")
    values, _ = Decoder(registers, plan_reads(registers)).decode([words])
    assert values[0] == pytest.approx((1020 * 0.1 + 10.0 - 32.0) * 5.0 / 9.0)  # 112 °F
    assert values[1] == pytest.approx(689.4757293168361)


def base(**device: Any) -> dict[str, Any]:
    return {
        "devices": [
            {"name": "ok", "registers": [{"name": "a", "address": 0}]},
            {"name": "m", **device},
        ]
    }


def load(doc: dict[str, Any]) -> Any:
    return parse_config(doc, source="cell.toml", base_dir=Path("."))


REGS = [{"name": "a", "address": 0}, {"name": "b", "address": 1, "group": "slow"}]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        pytest.param(
            {"registers": [{"name": "a", "address": 0}, {"name": "a", "address": 1}]},
            "cell.toml: devices[1] (m).registers[1] (a).name: duplicate register name 'a'",
            id="duplicate register names",
        ),
        pytest.param(
            {"registers": REGS},
            "devices[1] (m).registers[1] (b).group: 'slow' is not a poll group of this device "
            "(declared: ['fast'])",
            id="a group without a declared interval",
        ),
        pytest.param(
            {"registers": REGS, "groups": {"fast": 100, "slw": 1000}},
            "devices[1] (m).registers[1] (b).group: 'slow' is not a poll group",
            id="a misspelt group",
        ),
        pytest.param(
            {"registers": [{"name": "a", "address": 0, "convert": "degF->degK"}]},
            "devices[1] (m).registers[0] (a).convert: unknown conversion 'degF->degK'",
            id="unknown conversion",
        ),
        pytest.param(
            {"registers": [{"name": "a", "address": 65535, "type": "float32"}]},
            "devices[1] (m).registers[0] (a): address 65535 + 2 registers exceeds 65535",
            id="a value running past the address space",
        ),
        pytest.param(
            {"registers": [{"name": "a", "address": 70000}]},
            "devices[1] (m).registers[0] (a).address: Expected `int` <= 65535",
            id="address out of range",
        ),
        pytest.param(
            {"registers": [{"name": "s", "address": 0, "type": "string"}]},
            "needs `length`",
            id="a string without a length",
        ),
        pytest.param(
            {"registers": [{"name": "c", "address": 0, "type": "float32", "table": "coil"}]},
            "holds single bits",
            id="a float in the coil table",
        ),
        pytest.param(
            {"registers": [{"name": "a", "address": 0}], "max_gap": -1},
            "devices[1] (m).max_gap: Expected `int` >= 0",
            id="negative max_gap",
        ),
        pytest.param(
            {"registers": [{"name": "a", "address": 0}], "groups": {"fast": 0}},
            "Expected `int` >= 1 - at `$.devices[1].groups[...]`",
            id="zero group interval",
        ),
        pytest.param(
            {"protocol": "modbus_rtu", "registers": [{"name": "a", "address": 0}]},
            "devices[1] (m): Object missing required field `port`",
            id="RTU without a port",
        ),
        pytest.param(
            {"protocol": "modbus_rtu", "port": "/dev/x", "unit_id": 0, "registers": REGS[:1]},
            "devices[1] (m).unit_id: Expected `int` >= 1",
            id="RTU broadcast unit id",
        ),
        pytest.param(
            {"protocol": "modbus_rtu", "port": "/dev/x", "parity": "X", "registers": REGS[:1]},
            "devices[1] (m).parity: Invalid enum value 'X'",
            id="RTU parity",
        ),
    ],
)
def test_invalid_modbus_devices_are_refused_naming_the_key_path(
    device: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(base(**device))
    assert message in str(err.value)


def rtu(name: str, port: str, unit: int, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "modbus_rtu",
        "port": port,
        "unit_id": unit,
        "registers": [{"name": "a", "address": 0}],
        **kw,
    }


def test_rtu_units_on_one_port_must_agree_on_line_settings_and_have_distinct_ids() -> None:
    with pytest.raises(
        ConfigError,
        match=r"devices\[1\] \(b\).port: '/dev/ttyUSB0' is shared with devices\[0\] \(a\)",
    ):
        load({"devices": [rtu("a", "/dev/ttyUSB0", 1), rtu("b", "/dev/ttyUSB0", 2, baudrate=9600)]})
    with pytest.raises(
        ConfigError,
        match=r"devices\[1\] \(b\).unit_id: unit 1 on '/dev/ttyUSB0' is already devices\[0\] \(a\)",
    ):
        load({"devices": [rtu("a", "/dev/ttyUSB0", 1), rtu("b", "/dev/ttyUSB0", 1)]})
    cfg = load({"devices": [rtu("a", "/dev/ttyUSB0", 1), rtu("b", "/dev/ttyUSB1", 1)]})
    assert [type(d) for d in cfg.devices] == [ModbusRtuConfig, ModbusRtuConfig]


def test_a_valid_map_with_groups_conversion_strings_and_max_gap_loads() -> None:
    cfg = load(
        base(
            groups={"fast": 50, "slow": 1000},
            max_gap=4,
            stale_after_s=2.5,
            registers=[
                {"name": "t", "address": 0, "convert": "degF->degC"},
                {"name": "serial", "address": 10, "type": "string", "length": 8, "group": "slow"},
                {"name": "p", "address": 20, "type": "float32", "group": "slow"},
            ],
        )
    )
    dev = cfg.devices[1]
    assert isinstance(dev, ModbusTcpConfig)
    assert dev.group_intervals_ms() == {"fast": 50, "slow": 1000}
    assert (dev.max_gap, dev.stale_after_s) == (4, 2.5)
    assert [r.numeric for r in dev.registers] == [True, False, True]
    assert cfg.devices[0].group_intervals_ms() == {"fast": 100}  # type: ignore[union-attr]


def test_a_profile_register_in_an_undeclared_group_names_the_profile() -> None:
    with pytest.raises(
        ConfigError,
        match=r"devices\[1\] \(m\).registers\[0\] \(spindle_speed\).group.*in profile 'cnc-sim'",
    ):
        load(base(profile="cnc-sim", groups={"slow": 1000}))


def test_nan_is_not_a_conversion_result_for_finite_inputs() -> None:
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in units.CONVERSIONS.values())


def test_the_shipped_rtu_vfd_profile_loads_with_two_groups_and_plans_one_read_each() -> None:
    cfg = load(
        {
            "devices": [
                {
                    "name": "vfd",
                    "protocol": "modbus_rtu",
                    "port": "/dev/ttyUSB0",
                    "profile": "spindle-vfd-rtu",
                    "groups": {"fast": 100, "slow": 2000},
                    "max_gap": 2,
                }
            ]
        }
    )
    (dev,) = cfg.devices
    assert isinstance(dev, ModbusRtuConfig)
    numeric = [r for r in dev.registers if r.numeric]
    fast = plan_reads([r for r in numeric if r.group == "fast"], max_gap=dev.max_gap)
    slow = plan_reads([r for r in numeric if r.group == "slow"], max_gap=dev.max_gap)
    assert [(r.address, r.count) for r in fast] == [(0, 5)]
    assert [(r.address, r.count) for r in slow] == [(16, 4)]
    with pytest.raises(ConfigError, match="'slow' is not a poll group"):
        load({"devices": [{"name": "vfd", "port": 502, "profile": "spindle-vfd-rtu"}]})


def test_the_rtu_example_in_the_configuration_docs_loads() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text("utf-8")
    blocks = [b.split("```", 1)[0] for b in doc.split("```toml\n")[1:]]
    (example,) = [b for b in blocks if 'protocol = "modbus_rtu"' in b]
    cfg = load(tomllib.loads(example))
    (dev,) = cfg.devices
    assert isinstance(dev, ModbusRtuConfig)
    assert (dev.port, dev.unit_id, dev.baudrate, dev.parity) == ("/dev/ttyUSB0", 3, 9600, "E")
    assert dev.group_intervals_ms() == {"fast": 100, "slow": 1000}


def test_a_value_larger_than_the_devices_read_limit_is_refused_at_load() -> None:
    regs = [
        {"name": "a", "address": 0},
        {"name": "s", "address": 4, "type": "string", "length": 40},
    ]
    with pytest.raises(
        ConfigError,
        match=r"devices\[1\] \(m\).registers\[1\] \(s\): 20 registers do not fit one read",
    ):
        load(base(registers=regs, max_registers=16))
