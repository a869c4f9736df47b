"""Register maps imported from the spreadsheet a plant already has (``appliance profile from-csv``).

The CSV has a header row; columns are matched by name in any letter case and order, extra columns
are ignored, and a blank optional cell takes the default (so a device-level ``order``/``type``
in the appliance config still applies to it):

========  ========  =========================================================================
column    required  meaning (as in a profile's ``[[registers]]``)
========  ========  =========================================================================
name      yes       channel name (a letter or ``_``, then letters, digits, ``_``)
address   yes       request address, 0-based as on the wire (decimal, or ``0x`` hex)
table     no        ``holding`` (default), ``input``, ``coil``, ``discrete``
type      no        ``uint16`` (default), ``int16``, ``float32``, ... (``bool`` for coils)
order     no        ``ABCD`` (default), ``CDAB``, ``BADC``, ``DCBA``, any letter case
scale     no        engineering value = raw * scale + offset (default 1)
offset    no        (default 0)
unit      no        engineering unit, text
========  ========  =========================================================================

Rows are numbered as a spreadsheet shows them (the header is row 1); every error names the file,
the row and the column. The profile written is checked by loading it back with
:func:`~drivers.modbus.registers.load_profile`, the code the appliance config uses.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from drivers.modbus.registers import (
    Register,
    RegisterMapError,
    check_register_map,
    load_profile,
    with_defaults,
)

COLUMNS = ("name", "address", "table", "type", "order", "scale", "offset", "unit")
REQUIRED = ("name", "address")
_FLOATS = ("scale", "offset")
_LOWER = ("table", "type")


class ProfileCsvError(RegisterMapError):
    """The CSV cannot become a register map; the message names the file, row and column."""


def _cell_value(column: str, text: str) -> Any:
    """A cell as the profile value; raises ``ValueError`` with what is wrong."""
    if column == "address":
        try:
            return int(text, 0)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer address") from None
    if column in _FLOATS:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if column in _LOWER:
        return text.lower()
    return text


def read_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The register tables of the CSV at ``path`` (only the cells given) and the spreadsheet
    row number of each. Raises :class:`ProfileCsvError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileCsvError(f"{path}: cannot read: {err}") from None
    lines = text.splitlines()
    first = lines[0] if lines else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    if not rows:
        raise ProfileCsvError(f"{path}: row 1: empty file (expected a header row)")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ProfileCsvError(
            f"{path}: row 1: missing column(s) {missing} (columns: {', '.join(COLUMNS)})"
        )
    index = {c: header.index(c) for c in COLUMNS if c in header}
    out: list[dict[str, Any]] = []
    numbers: list[int] = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        raw: dict[str, Any] = {}
        for column, i in index.items():
            cell = row[i].strip() if i < len(row) else ""
            if not cell:
                if column in REQUIRED:
                    raise ProfileCsvError(f"{path}: row {n}, column {column}: empty (required)")
                continue
            try:
                raw[column] = _cell_value(column, cell)
            except ValueError as err:
                raise ProfileCsvError(f"{path}: row {n}, column {column}: {err}") from None
        out.append(raw)
        numbers.append(n)
    if not out:
        raise ProfileCsvError(f"{path}: no register rows below the header")
    return out, numbers


_AT = re.compile(r" - at `\$\.(\w+)`$")
_INDEX = re.compile(r"^registers\[(\d+)\] \([^)]*\)(?:\.(\w+))?: (.*)$", re.S)


def parse_csv(path: str | Path) -> tuple[list[dict[str, Any]], tuple[Register, ...]]:
    """The CSV's register tables and the validated registers (same checks as a profile).
    Raises :class:`ProfileCsvError` naming the row and column."""
    raws, numbers = read_csv(path)
    normalized = with_defaults(raws)  # orders in upper case
    assert isinstance(normalized, list)
    raws = normalized
    registers: list[Register] = []
    for raw, n in zip(raws, numbers, strict=True):
        try:
            registers.append(msgspec.convert(raw, Register))
        except msgspec.ValidationError as err:
            msg = str(err)
            m = _AT.search(msg)
            if m is not None:
                column, msg = m.group(1), msg[: m.start()]
            else:  # a check across cells of the row
                column = "address" if msg.startswith("address") else "type"
            raise ProfileCsvError(f"{path}: row {n}, column {column}: {msg}") from None
    try:
        check_register_map(registers, "registers")
    except RegisterMapError as err:
        m = _INDEX.match(str(err))
        if m is None:
            raise ProfileCsvError(f"{path}: {err}") from None
        row = numbers[int(m.group(1))]
        column = m.group(2) or "name"
        what = re.sub(
            r"registers\[(\d+)\]", lambda x: f"row {numbers[int(x.group(1))]}", m.group(3)
        )
        raise ProfileCsvError(f"{path}: row {row}, column {column}: {what}") from None
    return raws, tuple(registers)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    return repr(value)


def to_toml(raws: Sequence[dict[str, Any]], description: str) -> str:
    """A profile document: ``description`` and one ``[[registers]]`` table per row, holding
    only the cells that were given (in :data:`COLUMNS` order)."""
    out = [f"description = {_toml_value(description)}"]
    for raw in raws:
        out.append("\n[[registers]]")
        out += [f"{c} = {_toml_value(raw[c])}" for c in COLUMNS if c in raw]
    return "\n".join(out) + "\n"


def csv_to_profile(src: str | Path, out: str | Path) -> tuple[Register, ...]:
    """Write the profile for the CSV ``src`` to ``out`` and return its registers as the
    appliance will load them. Raises :class:`ProfileCsvError` (CSV errors) or
    :class:`RegisterMapError` (the written file does not load back, which is a bug)."""
    src, out = Path(src), Path(out)
    raws, _ = parse_csv(src)
    text = to_toml(raws, f"Imported from {src.name} by `appliance profile from-csv`")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ProfileCsvError(f"{out}: cannot write: {err}") from None
    return load_profile(str(out.resolve()))
