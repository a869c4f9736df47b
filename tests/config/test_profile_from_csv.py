"""`appliance profile from-csv`: a plant's register-map spreadsheet becomes a profile that
`profile = "<path>"` uses; every error names the CSV row and column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config
from drivers.modbus.profile_csv import ProfileCsvError, parse_csv

SHEET = """\
Name,Address,Table,Type,Order,Scale,Offset,Unit,Comment
oil_temp,0,input,float32,cdab,,,degC,hydraulic oil
strokes,2,holding,uint32,,,,,
pressure,4,input,,,0.1,-5,bar,
door_open,0,coil,bool,,,,,

mode,0x10,,,,,,,operating mode
"""


def test_a_sheet_becomes_a_profile_the_config_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = tmp_path / "press.csv"
    sheet.write_text(SHEET)
    assert main(["profile", "from-csv", str(sheet)]) == 0
    assert "press.toml: 5 registers" in capsys.readouterr().out
    cfg_path = tmp_path / "cell.toml"
    cfg_path.write_text(
        '[[devices]]\nname = "press-1"\nprofile = "press.toml"\ntype = "int16"\n'
        '[[alerts.rules]]\nname = "hot"\nchannel = "oil_temp"\nabove = 80\n'
    )
    regs = {r.name: r for r in load_config(cfg_path).devices[0].registers}
    assert list(regs) == ["oil_temp", "strokes", "pressure", "door_open", "mode"]
    oil, pressure = regs["oil_temp"], regs["pressure"]
    assert (oil.table, oil.type, oil.order, oil.unit) == ("input", "float32", "CDAB", "degC")
    assert (regs["strokes"].type, regs["strokes"].address) == ("uint32", 2)
    # blank cells take the defaults, or the device's `type` from the config
    assert (pressure.type, pressure.scale, pressure.offset) == ("int16", 0.1, -5.0)
    assert (regs["door_open"].table, regs["door_open"].type) == ("coil", "bool")
    assert (regs["mode"].address, regs["mode"].type, regs["mode"].table) == (16, "int16", "holding")


def test_out_and_an_existing_file_is_not_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = tmp_path / "press.csv"
    sheet.write_text(SHEET)
    out = tmp_path / "maps" / "p.toml"
    out.parent.mkdir()
    assert main(["profile", "from-csv", str(sheet), "--out", str(out)]) == 0
    assert main(["profile", "from-csv", str(sheet), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["profile", "from-csv", str(sheet), "--out", str(out), "--force"]) == 0


def test_semicolon_separated_excel_exports_are_read(tmp_path: Path) -> None:
    sheet = tmp_path / "p.csv"
    sheet.write_text("\ufeffname;address;type\nt;3;int16\n", encoding="utf-8")
    _, regs = parse_csv(sheet)
    assert [(r.name, r.address, r.type) for r in regs] == [("t", 3, "int16")]


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ("a,1,holding,flaot32\n", "row 2, column type: Invalid enum value 'flaot32'"),
        ("a,x,holding,uint16\n", "row 2, column address: 'x' is not an integer address"),
        ("a,1,tank,uint16\n", "row 2, column table: Invalid enum value 'tank'"),
        (",1,,\n", "row 2, column name: empty (required)"),
        ("9a,1,,\n", "row 2, column name:"),
        ("a,1,,\nb,2,coil,float32\n", "row 3, column type: table 'coil' holds single bits"),
        ("a,70000,,\n", "row 2, column address: Expected `int` <= 65535"),
        ("a,0,,float32\nb,1,,\n", "row 3, column address: holding 1 overlaps row 2 (a) at 0-1"),
        ("a,0,,\na,5,,\n", "row 3, column name: duplicate register name 'a' (first at row 2)"),
    ],
)
def test_errors_name_the_row_and_the_column(tmp_path: Path, rows: str, needle: str) -> None:
    sheet = tmp_path / "p.csv"
    sheet.write_text("name,address,table,type\n" + rows)
    with pytest.raises(ProfileCsvError) as exc:
        parse_csv(sheet)
    assert str(exc.value).startswith(f"{sheet}: ")
    assert needle in str(exc.value)


def test_a_sheet_without_the_required_columns_names_row_1(tmp_path: Path) -> None:
    sheet = tmp_path / "p.csv"
    sheet.write_text("tag,register\na,1\n")
    with pytest.raises(ProfileCsvError, match=r"row 1: missing column\(s\) \['name', 'address'\]"):
        parse_csv(sheet)


def test_the_command_exits_2_naming_the_row_and_explains_the_columns_in_help(
    tmp_path: Path,
) -> None:
    sheet = tmp_path / "p.csv"
    sheet.write_text("name,address,type\nok,0,uint16\nbad,1,flaot32\n")
    cmd = [sys.executable, "-m", "appliance", "profile", "from-csv"]
    res = subprocess.run([*cmd, str(sheet)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "row 3, column type" in res.stderr
    assert not (tmp_path / "p.toml").exists()
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for column in ("name", "address", "table", "type", "order", "scale", "offset", "unit"):
        assert f"\n  {column} " in res.stdout
