"""Register maps: typed, validated descriptions of what to read from a Modbus device.

A map is a list of :class:`Register`. Maps are written inline in the appliance config or kept as
reusable profiles in ``drivers/profiles/<name>.toml`` (a TOML file with a ``[[registers]]`` array).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from drivers.modbus.codec import ByteOrder, ValueType, register_count
from drivers.units import UnknownConversion, conversion

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

Table = Literal["holding", "input", "coil", "discrete"]

#: The poll group a register belongs to unless it names one (see ``group`` on :class:`Register`).
DEFAULT_GROUP = "fast"
GroupName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,31}$")]


class RegisterMapError(ValueError):
    """A register map is invalid; the message names the key path."""


class Register(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One value on a device. Engineering value = ``convert(raw * scale + offset)``.

    ``convert`` names a unit conversion from :data:`drivers.units.CONVERSIONS` (applied after
    scale and offset). ``group`` names the poll group (its interval is set per device).
    ``string`` registers are not numeric channels: drivers read them once per connection and
    expose them as text (``strings``), never in frames.
    """

    name: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    address: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    type: ValueType = "uint16"
    table: Table = "holding"
    order: ByteOrder = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    bit: Annotated[int, msgspec.Meta(ge=0, le=15)] = 0
    length: Annotated[int, msgspec.Meta(ge=0, le=250)] = 0
    convert: str = ""
    group: GroupName = DEFAULT_GROUP

    def __post_init__(self) -> None:
        if self.type == "string" and self.length == 0:
            raise ValueError("type 'string' needs `length` (characters)")
        if self.table in ("coil", "discrete") and self.type not in ("bool", "bit"):
            raise ValueError(f"table {self.table!r} holds single bits: type must be 'bool'")
        if self.type == "string" and self.convert:
            raise ValueError("a string register cannot have `convert`")
        if self.address + self.count > 65536:
            raise ValueError(f"address {self.address} + {self.count} registers exceeds 65535")

    @property
    def count(self) -> int:
        """Registers (or bits, for coil/discrete tables) this value occupies."""
        if self.table in ("coil", "discrete"):
            return 1
        return register_count(self.type, self.length)

    @property
    def numeric(self) -> bool:
        """True for registers that are channels (everything but ``string``)."""
        return self.type != "string"


def check_register_map(
    registers: Sequence[Register], where: str, groups: Sequence[str] | None = None
) -> None:
    """Checks a single entry cannot make: duplicate names, unknown conversions, unknown groups,
    values of one table that share an address (see :func:`_check_overlaps`).

    ``groups`` lists the poll groups the device declares (``None``: any group is accepted).
    Errors name the key path with the names of the entries, e.g.
    ``devices[2] (press-1).registers[7] (oil_temp).group: ...``.
    """
    seen: dict[str, int] = {}
    for i, reg in enumerate(registers):
        try:
            conversion(reg.convert)
        except UnknownConversion as err:
            raise RegisterMapError(f"{where}[{i}] ({reg.name}).convert: {err}") from None
        if groups is not None and reg.group not in groups:
            raise RegisterMapError(
                f"{where}[{i}] ({reg.name}).group: {reg.group!r} is not a poll group of this "
                f"device (declared: {sorted(groups)})"
            )
        if reg.name in seen:
            raise RegisterMapError(
                f"{where}[{i}] ({reg.name}).name: duplicate register name {reg.name!r} "
                f"(first at {where}[{seen[reg.name]}])"
            )
        seen[reg.name] = i
    _check_overlaps(registers, where)


def _check_overlaps(registers: Sequence[Register], where: str) -> None:
    """Two values of one table must not share an address: a float32 at 4-5 and a uint16 at 5
    would decode the same register twice as different things. ``bit`` values overlap only a
    ``bit`` value of the same register and bit (several bits of one status word, or the word
    itself next to its bits, are a normal map)."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    bits: dict[tuple[str, int, int], int] = {}
    for i, reg in enumerate(registers):
        if reg.type == "bit":
            key = (reg.table, reg.address, reg.bit)
            if key in bits:
                j = bits[key]
                raise RegisterMapError(
                    f"{where}[{i}] ({reg.name}).bit: bit {reg.bit} of {reg.table} register "
                    f"{reg.address} is also {where}[{j}] ({registers[j].name})"
                )
            bits[key] = i
        else:
            spans.setdefault(reg.table, []).append((reg.address, reg.address + reg.count, i))
    for table, entries in spans.items():
        entries.sort()
        end, holder = -1, -1
        for start, stop, i in entries:
            if start < end:
                a, b = sorted((holder, i))
                ra, rb = registers[a], registers[b]
                raise RegisterMapError(
                    f"{where}[{b}] ({rb.name}).address: {table} {_span(rb)} overlaps "
                    f"{where}[{a}] ({ra.name}) at {_span(ra)}"
                )
            if stop > end:
                end, holder = stop, i


def _span(reg: Register) -> str:
    last = reg.address + reg.count - 1
    return f"{reg.address}" if last == reg.address else f"{reg.address}-{last}"


def with_defaults(
    registers: object, *, order: str | None = None, type: str | None = None
) -> object:
    """Raw register tables (decoded TOML) with a device's defaults applied, before validation.

    A register without ``order`` gets ``order``, one without ``type`` in a ``holding``/``input``
    table gets ``type`` (coils and discrete inputs hold bits); ``order`` is accepted in any
    letter case (``cdab``). Anything that is not a list of tables is returned unchanged, for
    the validation to report.
    """
    if not isinstance(registers, list):
        return registers
    out: list[object] = []
    for raw in registers:
        if isinstance(raw, dict):
            raw = dict(raw)
            if order is not None:
                raw.setdefault("order", order)
            if type is not None and raw.get("table", "holding") in ("holding", "input"):
                raw.setdefault("type", type)
            if isinstance(raw.get("order"), str):
                raw["order"] = raw["order"].upper()
        out.append(raw)
    return out


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def named_path(path: str, data: object) -> str:
    """``.devices[2].registers[7].type`` → ``devices[2] (press-1).registers[7] (oil_temp).type``:
    every array element of ``data`` (the raw document) on the path that has a string ``name``
    gets it added after its index."""
    out: list[str] = []
    node: object = data
    for m in _STEP.finditer(path):
        if m.group(1) is not None:
            out.append(("." if out else "") + m.group(1))
            node = node.get(m.group(1)) if isinstance(node, dict) else None
        else:
            i = int(m.group(2))
            out.append(f"[{i}]")
            node = node[i] if isinstance(node, list) and i < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str):
                out.append(f" ({name})")
    return "".join(out)


def describe_validation_error(err: msgspec.ValidationError, data: object) -> str:
    """A msgspec error as ``<key path with names>: <what>`` (see :func:`named_path`); the
    message unchanged when it has no path."""
    m = _AT.match(str(err))
    if m is None or not m.group("path"):
        return str(err)
    return f"{named_path(m.group('path'), data)}: {m.group('msg')}"


class _Profile(msgspec.Struct, forbid_unknown_fields=True):
    description: str = ""
    registers: list[Register] = msgspec.field(default_factory=list)


def profile_path(name: str) -> Path:
    """Path of a shipped profile by name (``cnc-sim``), or ``name`` itself if it is a path (it
    has a ``/`` or ends in ``.toml``; a relative one is relative to the working directory, so
    callers resolve it against their own base first)."""
    if "/" in name or name.endswith(".toml"):
        return Path(name)
    return PROFILE_DIR / f"{name}.toml"


def load_profile(
    name: str, *, order: str | None = None, type: str | None = None
) -> tuple[Register, ...]:
    """Load and validate a register-map profile. Raises :class:`RegisterMapError`.

    ``order``/``type``: the device's defaults for registers that do not set their own
    (:func:`with_defaults`).
    """
    path = profile_path(name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
        raise RegisterMapError(f"profile {name!r}: no file {path} (shipped: {known})") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise RegisterMapError(f"profile {name!r} ({path}): {err}") from None
    if isinstance(data.get("registers"), list):
        data["registers"] = with_defaults(data["registers"], order=order, type=type)
    try:
        prof = msgspec.convert(data, _Profile)
    except msgspec.ValidationError as err:
        what = describe_validation_error(err, data)
        raise RegisterMapError(f"profile {name!r} ({path}): {what}") from None
    check_register_map(prof.registers, "registers")
    return tuple(prof.registers)
