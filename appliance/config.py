"""The appliance configuration: one TOML file, typed with msgspec and validated once at load.

Every error names the file, the key path (with the names of devices, registers and rules on
it) and the offending value, e.g.::

    appliance.toml: devices[0] (press-1).registers[5] (oil_temp).type: Invalid enum value 'flaot32'

Relative paths in the file (``outbox.path``, ``engine.model`` and device ``profile`` values that
are paths, the MQTT certificate and password files) are resolved against the directory of the
config file, never the working directory (systemd starts the service in ``/``). See
``docs/configuration.md`` for every key.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from appliance.errors import ConfigError
from drivers.modbus.codec import ByteOrder, ValueType
from drivers.modbus.registers import (
    DEFAULT_GROUP,
    GroupName,
    Register,
    RegisterMapError,
    check_register_map,
    describe_validation_error,
    load_profile,
    with_defaults,
)
from drivers.modbus.waveform import HEADER_REGISTERS, MAX_CAPACITY
from drivers.units import UnknownConversion, conversion

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ApplianceSection(_Section, frozen=True):
    """``health_log_s``: seconds between the one-line health summaries ``appliance run`` logs
    at INFO (0: none)."""

    id: Name = "appliance-01"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    health_log_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    #: how long ``appliance run`` waits at stop for the outbox to drain (SIGINT/SIGTERM)
    drain_timeout_s: PositiveFloat = 10.0
    #: run without devices (alerts on scores only, no telemetry): must be said explicitly
    allow_no_devices: bool = False


class _DeviceBase(_Section, frozen=True, tag_field="protocol"):
    """Fields every device has. ``protocol`` selects the concrete class (a tagged union)."""

    name: Name
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=1)] = 100
    timeout_s: PositiveFloat = 1.0


GroupMs = Annotated[int, msgspec.Meta(ge=1)]


class _ModbusBase(_DeviceBase, frozen=True):
    """Fields every Modbus device has (TCP and RTU). Registers come from ``profile`` or are
    listed inline. ``groups`` maps poll-group names to intervals in ms (default: one group
    ``fast`` at ``poll_interval_ms``); every register's ``group`` must be declared.
    ``order``/``type``: defaults for the registers (inline or from the profile) that do not
    set their own (``type`` only in the ``holding``/``input`` tables). ``max_gap``: unused
    addresses one read may span (coalescing); ``max_registers``/``max_bits``
    cap one read for devices with small buffers. ``stale_after_s``: how long the last good value
    is repeated with quality STALE when a read fails, before it turns BAD/NaN."""

    profile: str = ""
    registers: tuple[Register, ...] = ()
    order: ByteOrder = "ABCD"
    type: ValueType = "uint16"
    groups: dict[GroupName, GroupMs] = msgspec.field(default_factory=dict)
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=124)] = 0
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] = 125
    max_bits: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 2000
    stale_after_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0

    def __post_init__(self) -> None:
        if not self.profile and not self.registers:
            raise ValueError("give `profile` (a register-map profile) or `registers`")

    def group_intervals_ms(self) -> dict[str, int]:
        """Poll group → interval (ms): ``groups``, or ``{"fast": poll_interval_ms}``."""
        return dict(self.groups) if self.groups else {DEFAULT_GROUP: self.poll_interval_ms}


ChannelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class WaveformConfig(_Section, frozen=True):
    """A high-rate signal (e.g. 1 kHz vibration) read from the device's sample FIFO window.

    The block (layout in :mod:`drivers.modbus.waveform`) is ``HEADER_REGISTERS + capacity``
    registers of ``table`` starting at request address ``address``, read whole every
    ``interval_ms`` on its own connection; its samples become channel ``channel`` of the device.
    Keep ``interval_ms`` below ``capacity / rate_hz`` (120 ms for 120 samples at 1 kHz) or
    samples are overwritten before they are read (counted as ``lost``; the device's rate is only
    known at run time, so this is not checked at load). ``max_skew_s``: how far (seconds) the
    read time may drift from the sample clock before sample timestamps are re-anchored.
    """

    channel: ChannelName = "vibration_wave"
    address: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 200
    capacity: Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)] = MAX_CAPACITY
    table: Literal["holding", "input"] = "input"
    interval_ms: Annotated[int, msgspec.Meta(ge=1)] = 50
    max_skew_s: PositiveFloat = 0.25

    def __post_init__(self) -> None:
        end = self.address + HEADER_REGISTERS + self.capacity
        if end > 65536:
            raise ValueError(
                f"the block {self.address}..{end - 1} ({HEADER_REGISTERS} header registers + "
                f"{self.capacity} samples) runs past register 65535"
            )


class ModbusTcpConfig(_ModbusBase, frozen=True, tag="modbus_tcp"):
    """One Modbus TCP device (``host:port``, unit ``unit_id``); ``waveform``: an optional
    high-rate signal read from the device's sample FIFO (:class:`WaveformConfig`). ``client``:
    the Modbus TCP client of its polls and writes (:mod:`drivers.modbus.tcp`)."""

    host: str = "127.0.0.1"
    port: Port = 502
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1
    client: Literal["native", "pymodbus"] = "native"
    waveform: WaveformConfig | None = None


class ModbusRtuConfig(_ModbusBase, frozen=True, kw_only=True, tag="modbus_rtu"):
    """One Modbus RTU unit on a serial line (``port``: ``/dev/ttyUSB0``, ``socket://gw:4001``).

    Units on the same ``port`` share one bus (one lock, one thread); their line settings must
    agree. ``inter_frame_gap_ms`` defaults to 3.5 character times (1.75 ms above 19200 baud).
    ``local_echo``: the RS-485 adapter echoes what it sends; read and discard the echo.
    """

    port: Annotated[str, msgspec.Meta(min_length=1)]
    unit_id: Annotated[int, msgspec.Meta(ge=1, le=247)] = 1
    baudrate: Annotated[int, msgspec.Meta(ge=300, le=4_000_000)] = 19200
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    inter_frame_gap_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] | None = None
    local_echo: bool = False

    def line_settings(self) -> tuple[object, ...]:
        """What units sharing a port must agree on."""
        return (
            self.baudrate,
            self.bytesize,
            self.parity,
            self.stopbits,
            self.inter_frame_gap_ms,
            self.local_echo,
        )


def is_path(name: str) -> bool:
    """Whether a ``profile`` or ``engine.model`` value is a path (has a ``/``, or ends in
    ``.toml``/``.onnx``) rather than the name of a shipped one."""
    return "/" in name or name.endswith((".toml", ".onnx"))


def _resolve_modbus(
    dev: ModbusTcpConfig | ModbusRtuConfig, where: str, base_dir: Path | None = None
) -> Any:
    """Resolve a Modbus device's profile into registers and check its map (key-path errors).
    A profile given as a path is resolved against ``base_dir`` (the config file's folder)."""
    groups = list(dev.group_intervals_ms())
    if dev.profile:
        if dev.registers:
            raise ValueError(f"{where}: give `profile` or `registers`, not both")
        if base_dir is not None and is_path(dev.profile):
            dev = msgspec.structs.replace(dev, profile=_resolve(base_dir, dev.profile))
        try:
            regs = load_profile(dev.profile, order=dev.order, type=dev.type)
            dev = msgspec.structs.replace(dev, registers=regs)
        except RegisterMapError as err:
            raise ValueError(f"{where}.profile: {err}") from None
        try:
            check_register_map(dev.registers, f"{where}.registers", groups)
        except RegisterMapError as err:
            raise ValueError(f"{err} (in profile {dev.profile!r})") from None
    else:
        try:
            check_register_map(dev.registers, f"{where}.registers", groups)
        except RegisterMapError as err:
            raise ValueError(str(err)) from None
    waveform = getattr(dev, "waveform", None)
    if isinstance(waveform, WaveformConfig) and any(
        r.name == waveform.channel for r in dev.registers
    ):
        raise ValueError(
            f"{where}.waveform.channel: {waveform.channel!r} is also a register of this device"
        )
    for i, reg in enumerate(dev.registers):  # each value must fit one read of this device
        limit = dev.max_bits if reg.table in ("coil", "discrete") else dev.max_registers
        if reg.count > limit:
            raise ValueError(
                f"{where}.registers[{i}] ({reg.name}): {reg.count} registers do not fit one "
                f"read of at most {limit} (max_registers/max_bits)"
            )
    return dev


def _check_rtu_buses(devices: list[Any]) -> None:
    """Units on one serial port: same line settings, distinct unit ids."""
    first: dict[str, tuple[int, ModbusRtuConfig]] = {}
    units: dict[tuple[str, int], int] = {}
    for i, dev in enumerate(devices):
        if not isinstance(dev, ModbusRtuConfig):
            continue
        if dev.port in first:
            j, other = first[dev.port]
            if dev.line_settings() != other.line_settings():
                raise ValueError(
                    f"devices[{i}] ({dev.name}).port: {dev.port!r} is shared with devices[{j}] "
                    f"({other.name}) but the line "
                    f"settings differ (baudrate, bytesize, parity, stopbits, "
                    f"inter_frame_gap_ms, local_echo)"
                )
        else:
            first[dev.port] = (i, dev)
        key = (dev.port, dev.unit_id)
        if key in units:
            raise ValueError(
                f"devices[{i}] ({dev.name}).unit_id: unit {dev.unit_id} on {dev.port!r} is "
                f"already devices[{units[key]}] ({devices[units[key]].name})"
            )
        units[key] = i


class ChannelRef(NamedTuple):
    """A channel of a device that has no register map (serial text protocols): its name."""

    name: str


class _TextDeviceBase(_DeviceBase, frozen=True):
    """Connection of a serial text-protocol device: ``serial_port`` or ``host``/``port``.

    ``serial_port`` is a device path (``/dev/ttyUSB0``) or any pyserial URL
    (``socket://moxa:4001`` for a raw terminal server, ``rfc2217://...``); ``host`` selects plain
    TCP. Give exactly one. Line settings apply to real serial ports only.
    """

    host: str = ""
    port: Port = 4001
    serial_port: str = ""
    baudrate: Annotated[int, msgspec.Meta(ge=50, le=4_000_000)] = 9600
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False

    def __post_init__(self) -> None:
        if bool(self.host) == bool(self.serial_port):
            raise ValueError("give exactly one of `serial_port` (serial/URL) or `host` (TCP)")
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits: {self.stopbits} is not one of 1, 1.5, 2")
        names = [c.name for c in self.registers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate channel names {dup}")
        if not names:
            raise ValueError("the device has no channels")

    @property
    def registers(self) -> tuple[ChannelRef, ...]:
        """The device's channels in ``ReadResult`` order (named like a register map's entries so
        code written for register-map devices, e.g. the poller, can list them)."""
        raise NotImplementedError


class HaasVariable(_Section, frozen=True):
    """A Q600 macro/system variable read as channel ``name`` (value * scale + offset)."""

    name: ChannelName
    var: Annotated[int, msgspec.Meta(ge=1, le=999999)]
    scale: float = 1.0
    offset: float = 0.0


class HaasConfig(_TextDeviceBase, frozen=True, tag="haas_q"):
    """A Haas control read with machine-data-collection Q commands (docs/drivers-text.md)."""

    port: Port = 5051
    command_prefix: Literal["?", ""] = "?"
    variables: tuple[HaasVariable, ...] = ()
    parts_channel: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$")] = (
        "parts_count"
    )
    running_channel: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$")] = (
        "running"
    )
    query_mode: bool = True

    @property
    def registers(self) -> tuple[ChannelRef, ...]:
        """Variables in config order, then ``parts_channel`` and ``running_channel`` if set."""
        names = [v.name for v in self.variables]
        names += [n for n in (self.parts_channel, self.running_channel) if n]
        return tuple(ChannelRef(n) for n in names)


class LineChannel(_Section, frozen=True):
    """Field ``key`` of each line (default: ``name``) as channel ``name`` (x * scale + offset)."""

    name: ChannelName
    key: str = ""
    scale: float = 1.0
    offset: float = 0.0


class LineConfig(_TextDeviceBase, frozen=True, tag="line"):
    """A sensor that streams CSV or key=value text lines (docs/drivers-text.md)."""

    format: Literal["csv", "kv"] = "csv"
    columns: tuple[str, ...] = ()
    separator: Annotated[str, msgspec.Meta(min_length=1)] = ","
    pair_separator: Annotated[str, msgspec.Meta(min_length=1)] = " "
    kv_separator: Annotated[str, msgspec.Meta(min_length=1)] = "="
    comment: str = "#"
    channels: tuple[LineChannel, ...] = ()
    max_line_bytes: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 1024
    silence_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "csv":
            if not self.columns:
                raise ValueError("format 'csv' needs `columns`")
            for i, ch in enumerate(self.channels):
                if (ch.key or ch.name) not in self.columns:
                    raise ValueError(
                        f"channels[{i}] ({ch.name}): key {ch.key or ch.name!r} is not one of "
                        f"columns {list(self.columns)}"
                    )
        elif self.columns:
            raise ValueError("`columns` is for format 'csv' only")

    @property
    def registers(self) -> tuple[ChannelRef, ...]:
        """The configured channels in config order."""
        return tuple(ChannelRef(c.name) for c in self.channels)


#: Every device kind, selected by its ``protocol`` key (default ``modbus_tcp``). New protocols
#: add their config class here.
DeviceConfig = ModbusTcpConfig | ModbusRtuConfig | HaasConfig | LineConfig
DEFAULT_PROTOCOL = "modbus_tcp"


class FeaturesSection(_Section, frozen=True):
    window_s: PositiveFloat = 1.0


class BatchSection(_Section, frozen=True):
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    max_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=60000)] = 20
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 1024


class EngineSection(_Section, frozen=True):
    #: "" (and no ``[[models]]``): no model, nothing is scored
    model: str = "cnc_anomaly"
    backend: Literal[
        "auto", "tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"
    ] = "auto"
    threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    #: serialized TensorRT engines (appliance/infer/cache.py); relative to the config file
    cache_dir: str = "/var/lib/appliance/engines"
    #: "auto": FP16 when the GPU has fast FP16 and the model's manifest allows it
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    #: TensorRT builder workspace limit
    workspace_mb: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 1024


Severity = Literal["info", "warning", "major", "critical"]

#: Rule kinds (docs/configuration.md ``[[alerts.rules]]``): what each one watches.
RULE_KINDS = ("high", "low", "rate", "stuck", "stale", "offline", "score")
#: ``for_s`` when a rule does not set it: seconds flat (stuck), without a good sample of the
#: channel (stale), without a good poll of the device (offline: 5 minutes, as in the seed).
DEFAULT_FOR_S = {"stuck": 60.0, "stale": 30.0, "offline": 300.0}


class AlertAction(_Section, frozen=True):
    """A local action of a rule (off unless configured): write ``value`` (engineering units of
    the register: scale and offset are undone) to the machine's register ``register`` when the
    alert is raised, and ``on_clear`` (if set) when it clears. The register must be listed in
    ``alerts.writable`` and be a 16-bit holding register or a coil of every machine the rule
    watches."""

    register: str
    value: float
    on_clear: float | None = None


class ThresholdRule(_Section, frozen=True):
    """One alert rule (``[[alerts.rules]]``); :attr:`rule_kind` says what it watches.

    ``high`` (the default; ``score`` when ``source = "score"``): raise above ``above``, clear
    below ``clear_below`` (default ``above``). ``low``: raise below ``below``, clear above
    ``clear_above``. ``rate``: the absolute rate of change (unit per second) between
    consecutive good samples above ``above``. ``stuck``: the channel stays within
    ``tolerance`` for ``for_s``. ``stale``: no good sample of the channel for ``for_s``.
    ``offline``: no good poll of the device for ``for_s`` (default 300 s). Lifecycle:
    ``debounce_k`` of the last ``debounce_n`` evaluations must agree to raise or clear;
    ``min_active_s``; ``cooldown_s`` after a clear; ``escalate_above`` lifts the severity to
    ``escalate_severity`` (an ``updated`` message), as does a new peak at most once per
    ``update_interval_s`` (0: never). ``unit``: the unit the levels are written in, converted
    at load to the channel's unit.
    """

    name: Name
    kind: Literal["high", "low", "rate", "stuck", "stale", "offline", "score"] | None = None
    above: float | None = None
    source: Literal["channel", "score"] = "channel"
    channel: str = ""
    clear_below: float | None = None
    below: float | None = None
    clear_above: float | None = None
    for_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tolerance: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    unit: str = ""
    severity: Severity = "warning"
    machines: tuple[str, ...] = ()
    debounce_k: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    debounce_n: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    min_active_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    escalate_above: float | None = None
    escalate_severity: Severity = "critical"
    update_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    evidence_samples: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    action: AlertAction | None = None
    #: designed suppression: no raise on a machine while one of these rules is active there
    suppressed_by: tuple[str, ...] = ()
    #: source = "score": the ``[[models]]`` name whose score the rule watches ("" = the first
    #: model, or ``engine.model`` when there is no ``[[models]]``)
    model: str = ""

    @property
    def rule_kind(self) -> str:
        """The kind in effect: ``kind``, else ``score`` for ``source = "score"``, else
        ``high``."""
        if self.kind is not None:
            return self.kind
        return "score" if self.source == "score" else "high"

    @property
    def duration_s(self) -> float:
        """``for_s`` or the kind's default (:data:`DEFAULT_FOR_S`)."""
        return self.for_s if self.for_s is not None else DEFAULT_FOR_S.get(self.rule_kind, 0.0)

    def __post_init__(self) -> None:
        kind = self.rule_kind
        if self.source == "channel" and self.model:
            raise ValueError("`model` must be empty when source = 'channel'")
        if self.kind == "score" and self.source != "score":
            raise ValueError("kind = 'score' needs source = 'score' (or leave `source` out)")
        if self.source == "score" and kind != "score":
            raise ValueError(f"source = 'score' goes with kind = 'score', not {kind!r}")
        if kind == "score" and self.channel:
            raise ValueError("`channel` must be empty when source = 'score'")
        if kind in ("high", "low", "rate", "stuck", "stale") and not self.channel:
            raise ValueError(f"`channel` is required for a {kind!r} rule")
        if kind == "offline" and self.channel:
            raise ValueError("an 'offline' rule watches devices: `channel` must be empty")
        if self.debounce_k > self.debounce_n:
            raise ValueError(
                f"debounce_k ({self.debounce_k}) must be <= debounce_n ({self.debounce_n})"
            )
        if kind in ("high", "rate", "score"):
            if self.above is None:
                raise ValueError(f"`above` is required for a {kind!r} rule")
            if self.below is not None or self.clear_above is not None:
                raise ValueError(f"`below`/`clear_above` belong to 'low' rules, not {kind!r}")
            if self.clear_below is not None and self.clear_below > self.above:
                raise ValueError(
                    f"clear_below ({self.clear_below}) must be <= above ({self.above})"
                )
            if self.escalate_above is not None and self.escalate_above < self.above:
                raise ValueError(
                    f"escalate_above ({self.escalate_above}) must be >= above ({self.above})"
                )
        elif kind == "low":
            if self.below is None:
                raise ValueError("`below` is required for a 'low' rule")
            if self.above is not None or self.clear_below is not None:
                raise ValueError("`above`/`clear_below` belong to 'high' rules, not 'low'")
            if self.clear_above is not None and self.clear_above < self.below:
                raise ValueError(
                    f"clear_above ({self.clear_above}) must be >= below ({self.below})"
                )
            if self.escalate_above is not None:
                raise ValueError("escalate_above does not apply to a 'low' rule")
        else:
            for key in ("above", "clear_below", "below", "clear_above", "escalate_above"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` does not apply to a {kind!r} rule (use for_s)")
        if self.for_s is not None and kind not in DEFAULT_FOR_S:
            raise ValueError(f"`for_s` applies to stuck/stale/offline rules, not {kind!r}")
        if self.unit and kind not in ("high", "low", "rate"):
            raise ValueError(f"`unit` applies to high/low/rate rules, not {kind!r}")


class ModelBinding(_Section, frozen=True):
    """One served model (``[[models]]``): bundle ``model`` (a shipped name or a path, relative
    to the config file) scoring the windows of ``machines`` (default: every device). Each model
    has its own batcher and engine; its scores go out with the machines' telemetry under
    ``name`` and score rules name it in ``model``."""

    name: Name
    model: str
    machines: tuple[str, ...] = ()


class AlertsSection(_Section, frozen=True):
    """``state_path``: the alert state store (SQLite); "" = ``<outbox stem>.alerts.sqlite``
    beside the outbox file. Relative to the config file."""

    rules: tuple[ThresholdRule, ...] = ()
    state_path: str = ""
    #: registers rules may write (``action``): the allowlist; empty = no writes at all
    writable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"alerts.rules[{i}] ({rule.name}).name: duplicate rule name")
            seen.add(rule.name)
        names = {r.name for r in self.rules}
        for i, rule in enumerate(self.rules):
            for other in rule.suppressed_by:
                if other not in names or other == rule.name:
                    raise ValueError(
                        f"alerts.rules[{i}] ({rule.name}).suppressed_by: {other!r} is not "
                        f"another rule (rules: {sorted(names)})"
                    )


class TelemetrySection(_Section, frozen=True):
    """``interval_s``: seconds per telemetry message, a multiple of ``features.window_s``
    (checked with the features section); 0 = one message per model window. ``deadband``:
    channel → band in its unit, reported by exception, at least every ``max_silence_s``."""

    enabled: bool = True
    stats: tuple[Literal["mean", "rms", "min", "max", "last", "std"], ...] = (
        "mean",
        "min",
        "max",
    )
    interval_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    deadband: dict[str, Annotated[float, msgspec.Meta(ge=0)]] = msgspec.field(default_factory=dict)
    max_silence_s: PositiveFloat = 300.0


class QualitySection(_Section, frozen=True):
    """Data-quality events (``appliance/alerts/quality.py``): seconds without a good sample
    (``stale_s``, 0: off), seconds flat within ``stuck_tolerance`` (``stuck_s``, 0: off),
    per-channel ``ranges`` ``[low, high]``, ``max_clock_skew_s`` (0: off)."""

    enabled: bool = True
    stale_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    stuck_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    stuck_tolerance: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    ranges: dict[str, tuple[float, float]] = msgspec.field(default_factory=dict)
    max_clock_skew_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0

    def __post_init__(self) -> None:
        for name, (low, high) in self.ranges.items():
            if not low < high:
                raise ValueError(f"quality.ranges.{name}: low ({low}) must be < high ({high})")


OUTBOX_PAGE_BYTES = 4096
"""SQLite page size of a new outbox file (an existing file keeps its own)."""
OUTBOX_EMPTY_PAGES = 6
"""Pages an empty outbox occupies: the header page and one root page per table."""
OUTBOX_BATCH_BYTES = 64 * 1024
"""One append batch (~60 machines' ~1 KB telemetry windows): room the budget keeps for it."""
OUTBOX_WAL_FRAME_BYTES = 24
"""Header bytes of each page the WAL file holds."""
_OUTBOX_WAL_SHARE = 8  # the WAL gets 1/8 of the budget ...
_OUTBOX_WAL_MIN_BYTES = 64 * 1024  # ... at least this ...
_OUTBOX_WAL_MAX_BYTES = 4 * 1024 * 1024  # ... and at most this (checkpoints: docs/benchmarks.md)


def outbox_wal_bytes(budget_bytes: int) -> int:
    """The part of an outbox's disk budget reserved for its WAL file: a checkpoint threshold
    (1/8 of the budget, 64 KiB..4 MiB) plus one append batch (a commit may carry the WAL that
    far past the threshold before the checkpoint that follows it)."""
    share = min(
        _OUTBOX_WAL_MAX_BYTES, max(_OUTBOX_WAL_MIN_BYTES, budget_bytes // _OUTBOX_WAL_SHARE)
    )
    return share + OUTBOX_BATCH_BYTES


def outbox_min_budget_bytes(page_bytes: int = OUTBOX_PAGE_BYTES) -> int:
    """The smallest ``outbox.disk_budget_mb`` (in bytes) that holds the empty outbox's pages,
    its WAL and one append batch."""
    return OUTBOX_EMPTY_PAGES * page_bytes + outbox_wal_bytes(0) + OUTBOX_BATCH_BYTES


class OutboxSection(_Section, frozen=True):
    path: str = "/var/lib/appliance/outbox.sqlite"
    synchronous: Literal["NORMAL", "FULL"] = "FULL"
    disk_budget_mb: PositiveFloat = 256.0
    coarsen_windows: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 10
    #: seconds delivered telemetry is kept for ``backfill`` (0: deleted on PUBACK, as before)
    keep_delivered_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0

    def __post_init__(self) -> None:
        least = outbox_min_budget_bytes()
        if not self.disk_budget_mb * 2**20 >= least:  # also refuses NaN
            raise ValueError(
                f"outbox.disk_budget_mb = {self.disk_budget_mb} cannot hold the empty outbox's "
                f"pages, its WAL and one append batch: give at least {least / 2**20:.2f} (MiB; "
                "the budget covers the WAL, see docs/configuration.md)"
            )
        if self.coarsen_windows == 1:
            raise ValueError(
                "outbox.coarsen_windows = 1 merges nothing: use 0 to evict old telemetry "
                "without coarsening it, or 2 or more"
            )


class MqttSection(_Section, frozen=True):
    """The MQTT uplink (docs/configuration.md ``[mqtt]``, docs/mqtt.md for subscribers).

    Secrets never live in this struct (so never in its ``repr`` or the effective-config dump):
    ``password_file`` / ``password_env`` name where the uplink reads the password when it
    connects. Relative file paths are resolved against the config file's directory.
    """

    host: str = "127.0.0.1"
    port: Port = 1883
    client_id: str = ""
    topic_prefix: Annotated[str, msgspec.Meta(pattern=r"^[^#+]+$")] = "edge"
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 100
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False
    username: str = ""
    password_file: str = ""
    password_env: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$")] = ""
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)] = 86400
    backlog_rate_per_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: messages per second a ``backfill`` command re-publishes at most (docs/mqtt.md)
    backfill_rate_per_s: PositiveFloat = 20.0
    historical_after_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    max_packet_bytes: Annotated[int, msgspec.Meta(ge=0, le=268_435_455)] = 0
    #: "json" (docs/mqtt.md) or "sparkplug_b" (Sparkplug B edge node, protobuf payloads)
    format: Literal["json", "sparkplug_b"] = "json"
    #: Sparkplug group id ("": topic_prefix, which must then be one topic level)
    sparkplug_group_id: Annotated[str, msgspec.Meta(pattern=r"^([^#+/]+)?$")] = ""

    def __post_init__(self) -> None:
        if (
            self.format == "sparkplug_b"
            and not self.sparkplug_group_id
            and any(c in self.topic_prefix for c in "/+#")
        ):
            raise ValueError(
                f"mqtt.sparkplug_group_id: needed with format = 'sparkplug_b' because "
                f"topic_prefix {self.topic_prefix!r} is not a single topic level"
            )
        if 0 < self.max_packet_bytes < 1024:
            raise ValueError(
                f"mqtt.max_packet_bytes = {self.max_packet_bytes} is below 1024 bytes: no "
                "telemetry message fits (0 means no limit of our own)"
            )
        if not self.tls:
            for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
                if getattr(self, key):
                    raise ValueError(f"mqtt.{key} needs mqtt.tls = true")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together (a client certificate)")
        if self.password_file and self.password_env:
            raise ValueError("mqtt: give password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("mqtt.username is required with password_file / password_env")


class DownlinkWrite(_Section, frozen=True):
    """One entry of the ``device.write`` allowlist (``[[downlink.writes]]``, docs/mqtt.md).

    ``device`` names a Modbus device; the target is either ``register`` (a register name of
    the device's map: a coil or a 16-bit holding register; values in its engineering unit,
    its scale/offset/convert undone as for alert actions) or ``address`` (raw, in ``table``
    ``holding`` (``type`` ``uint16``/``int16``) or ``coil``). ``min``/``max`` bound the value
    (engineering units for a register, raw for an address), inclusive."""

    device: Name
    min: float
    max: float
    register: str = ""
    address: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    table: Literal["holding", "coil"] | None = None
    type: Literal["uint16", "int16"] | None = None

    def __post_init__(self) -> None:
        if bool(self.register) == (self.address is not None):
            raise ValueError("give `register` (a register name) or `address`, exactly one")
        if self.register and (self.table is not None or self.type is not None):
            raise ValueError("`table`/`type` go with `address`; a `register` has its own")
        if not self.min <= self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")


class ApiSection(_Section, frozen=True):
    """The local HTTP API, Prometheus metrics and status page (docs/api.md).

    ``listen`` is the address to bind (127.0.0.1: only this host; 0.0.0.0: the cell's network).
    ``token_file`` holds the bearer token for requests that change state (acknowledging an
    alert); without it those requests are refused. ``max_body_bytes`` caps a request body (413
    above). ``history_s``: seconds of per-window channel means and scores kept for the status
    page's sparklines. ``refresh_ms``: how often the status page polls.
    """

    enabled: bool = False
    listen: str = "127.0.0.1"
    port: Port = 8080
    token_file: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 65536
    history_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    refresh_ms: Annotated[int, msgspec.Meta(ge=200, le=60000)] = 1000


class DownlinkSection(_Section, frozen=True):
    """The MQTT command channel (docs/mqtt.md "Commands", issue 16).

    ``enabled``: subscribe ``<prefix>/<appliance>/cmd/+`` and answer commands; false (the
    default): commands are not even subscribed. ``max_payload_bytes``: a request above it is
    refused (a ``model.release`` chunk must fit). ``dedup_keep``: request ids remembered (with
    their replies) so a redelivered request is answered again, not executed again; the oldest
    are dropped. ``apply_deadline_s``: how long a ``config.apply`` waits for the new pipeline
    to become ready before it restores the previous file and configuration.

    Model releases (docs/models.md, "Releasing a model"): ``model_keys`` are the Ed25519 public
    keys a release must be signed by, each ``"ed25519:<base64 of the 32 key bytes>"`` or the
    path of a PEM public key file (relative to the config file); none: every release is
    refused. ``max_model_bytes`` caps a release's archive (its chunks together);
    ``keep_models``: released versions of each model kept on disk for rollback (the active one
    included).
    """

    enabled: bool = False
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024, le=268_435_455)] = 256 * 1024
    dedup_keep: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    apply_deadline_s: PositiveFloat = 30.0
    #: the ``device.write`` allowlist (``[[downlink.writes]]``); empty: every write is refused
    writes: tuple[DownlinkWrite, ...] = ()
    model_keys: tuple[str, ...] = ()
    max_model_bytes: Annotated[int, msgspec.Meta(ge=1024, le=4 * 1024**3)] = 64 * 1024 * 1024
    keep_models: Annotated[int, msgspec.Meta(ge=2, le=100)] = 3

    def __post_init__(self) -> None:
        for i, key in enumerate(self.model_keys):
            if key.startswith("ed25519:"):
                try:
                    raw = base64.b64decode(key[len("ed25519:") :], validate=True)
                except binascii.Error:
                    raw = b""
                if len(raw) != 32:
                    raise ValueError(
                        f"downlink.model_keys[{i}]: 'ed25519:' must be followed by the base64 "
                        "of a 32-byte Ed25519 public key"
                    )
            elif not key.strip():
                raise ValueError(f"downlink.model_keys[{i}]: empty")


class Config(_Section, frozen=True):
    appliance: ApplianceSection = msgspec.field(default_factory=ApplianceSection)
    devices: tuple[DeviceConfig, ...] = ()
    features: FeaturesSection = msgspec.field(default_factory=FeaturesSection)
    batch: BatchSection = msgspec.field(default_factory=BatchSection)
    engine: EngineSection = msgspec.field(default_factory=EngineSection)
    #: several models at once; empty: one model, ``engine.model``, serving every machine
    models: tuple[ModelBinding, ...] = ()
    alerts: AlertsSection = msgspec.field(default_factory=AlertsSection)
    telemetry: TelemetrySection = msgspec.field(default_factory=TelemetrySection)
    quality: QualitySection = msgspec.field(default_factory=QualitySection)
    outbox: OutboxSection = msgspec.field(default_factory=OutboxSection)
    mqtt: MqttSection = msgspec.field(default_factory=MqttSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)
    downlink: DownlinkSection = msgspec.field(default_factory=DownlinkSection)


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _cross_checks(cfg: Config, base_dir: Path | None = None) -> Config:
    """Checks that span sections; resolves device profiles into registers (profile paths
    against ``base_dir``)."""
    names: dict[str, int] = {}
    devices: list[DeviceConfig] = []
    for i, dev in enumerate(cfg.devices):
        where = f"devices[{i}] ({dev.name})"
        if dev.name in names:
            raise ValueError(f"{where}.name: duplicate device name {dev.name!r}")
        names[dev.name] = i
        if isinstance(dev, (HaasConfig, LineConfig)):  # channels checked by the class itself
            devices.append(dev)
            continue
        dev = _resolve_modbus(dev, where, base_dir)
        devices.append(dev)
    _check_rtu_buses(devices)
    # String registers are not channels (no numeric samples): a rule on one could never fire.
    channels = {
        reg.name for dev in devices for reg in dev.registers if getattr(reg, "numeric", True)
    }
    channels |= {w.channel for dev in devices if (w := getattr(dev, "waveform", None)) is not None}
    interval, window = cfg.telemetry.interval_s, cfg.features.window_s
    if interval and (interval < window or abs(interval / window - round(interval / window)) > 1e-9):
        raise ValueError(
            f"telemetry.interval_s: {interval} is not a whole multiple of features.window_s "
            f"({window})"
        )
    for name in cfg.quality.ranges:
        if name not in channels:
            raise ValueError(
                f"quality.ranges.{name}: not a numeric channel of any device "
                f"(known: {sorted(channels)})"
            )
    for name in cfg.telemetry.deadband:
        if name not in channels:
            raise ValueError(
                f"telemetry.deadband.{name}: not a numeric channel of any device "
                f"(known: {sorted(channels)})"
            )
    rules: list[ThresholdRule] = []
    for i, rule in enumerate(cfg.alerts.rules):
        where = f"alerts.rules[{i}] ({rule.name})"
        if rule.channel and rule.channel not in channels:
            raise ValueError(
                f"{where}.channel: {rule.channel!r} is not a numeric channel of any device "
                f"(known: {sorted(channels)})"
            )
        for m in rule.machines:
            if m not in names:
                raise ValueError(f"{where}.machines: {m!r} is not a configured device")
        model_names = [b.name for b in cfg.models]
        if rule.source == "score" and not model_names and not cfg.engine.model:
            raise ValueError(
                f"{where}.source: 'score' but no model is configured (engine.model is empty "
                "and there is no [[models]] entry)"
            )
        if rule.model and rule.model not in model_names:
            raise ValueError(
                f"{where}.model: {rule.model!r} is not a [[models]] name (known: {model_names})"
            )
        if rule.action is not None:
            _check_action(rule.action, f"{where}.action", cfg.alerts.writable, rule, devices)
        rules.append(_rule_in_channel_unit(rule, where, devices))
    seen: set[str] = set()
    for i, binding in enumerate(cfg.models):
        where = f"models[{i}] ({binding.name})"
        if binding.name in seen:
            raise ValueError(f"{where}.name: duplicate model name {binding.name!r}")
        seen.add(binding.name)
        for m in binding.machines:
            if m not in names:
                raise ValueError(f"{where}.machines: {m!r} is not a configured device")
    alerts = msgspec.structs.replace(cfg.alerts, rules=tuple(rules))
    for i, entry in enumerate(cfg.downlink.writes):
        _check_write(entry, f"downlink.writes[{i}] ({entry.device})", devices)
    return msgspec.structs.replace(cfg, devices=tuple(devices), alerts=alerts)


#: Register types an action may write with one FC 6 request, and their raw ranges.
ACTION_TYPES = {"uint16": (0, 0xFFFF), "int16": (-0x8000, 0x7FFF)}


def action_raw(reg: Register, value: float) -> int | bool:
    """The raw value that makes ``reg`` read ``value`` (its ``convert``, scale and offset
    undone). Raises ``ValueError`` when none does
    (not a whole number of raw units, outside the type's range, a bit that is not 0 or 1)."""
    if reg.table == "coil":
        if value not in (0.0, 1.0):
            raise ValueError(f"a coil takes 0 or 1, not {value}")
        return bool(value)
    a, b = conversion(reg.convert) if reg.convert else (1.0, 0.0)
    exact = ((value - b) / a - reg.offset) / reg.scale
    raw = round(exact)
    if abs(exact - raw) > 1e-9 * max(1.0, abs(exact)):  # 0.3 / 0.1 is 2.9999999999999996
        raise ValueError(f"{value} is not a whole number of raw units (scale {reg.scale})")
    low, high = ACTION_TYPES[reg.type]
    if not low <= raw <= high:
        raise ValueError(f"{value} (raw {raw}) is outside {reg.type}")
    return raw


def _check_action(
    action: AlertAction,
    where: str,
    writable: tuple[str, ...],
    rule: ThresholdRule,
    devices: list[DeviceConfig],
) -> None:
    if action.register not in writable:
        raise ValueError(
            f"{where}.register: {action.register!r} is not in alerts.writable {list(writable)}"
        )
    watched = [d for d in devices if not rule.machines or d.name in rule.machines]
    for dev in watched:
        reg = next((r for r in getattr(dev, "registers", ()) if r.name == action.register), None)
        if reg is None:
            raise ValueError(
                f"{where}.register: device {dev.name} has no register {action.register!r}"
            )
        if not (reg.table == "coil" or (reg.table == "holding" and reg.type in ACTION_TYPES)):
            raise ValueError(
                f"{where}.register: {dev.name}.{reg.name} is {reg.table} {reg.type}; an action "
                "writes a coil or a 16-bit holding register (int16/uint16)"
            )
        for key in ("value", "on_clear"):
            value = getattr(action, key)
            if value is not None:
                try:
                    action_raw(reg, value)
                except ValueError as err:
                    raise ValueError(f"{where}.{key}: {dev.name}.{reg.name}: {err}") from None


def write_target(
    entry: DownlinkWrite, devices: tuple[DeviceConfig, ...] | list[DeviceConfig]
) -> tuple[str, int, str]:
    """``(table, address, type)`` a ``[[downlink.writes]]`` entry writes (``type`` ``bool``
    for a coil). Raises ``ValueError`` naming what is wrong (unknown device or register, a
    device that is not Modbus, a register that is not a coil or a 16-bit holding register)."""
    dev = next((d for d in devices if d.name == entry.device), None)
    if dev is None:
        raise ValueError(f"device {entry.device!r} is not a configured device")
    if not isinstance(dev, _ModbusBase):
        raise ValueError(f"device {entry.device!r} is not a Modbus device")
    if entry.address is not None:
        table = entry.table or "holding"
        return table, entry.address, "bool" if table == "coil" else entry.type or "uint16"
    reg = next((r for r in dev.registers if r.name == entry.register), None)
    if reg is None:
        raise ValueError(f"device {dev.name} has no register {entry.register!r}")
    if not (reg.table == "coil" or (reg.table == "holding" and reg.type in ACTION_TYPES)):
        raise ValueError(
            f"{dev.name}.{reg.name} is {reg.table} {reg.type}; a write goes to a coil or a "
            "16-bit holding register (int16/uint16)"
        )
    return reg.table, reg.address, "bool" if reg.table == "coil" else reg.type


def _check_write(entry: DownlinkWrite, where: str, devices: list[DeviceConfig]) -> None:
    try:
        table, _, type_ = write_target(entry, devices)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if entry.address is not None:
        low, high = (0, 1) if table == "coil" else ACTION_TYPES[type_]
        for key in ("min", "max"):
            value = getattr(entry, key)
            if value != int(value) or not low <= value <= high:
                raise ValueError(
                    f"{where}.{key}: {value} is not a raw {type_} value ({low}..{high})"
                )


def _rule_in_channel_unit(
    rule: ThresholdRule, where: str, devices: list[DeviceConfig]
) -> ThresholdRule:
    """``rule`` with its levels converted from ``rule.unit`` to the unit of its channel (the
    registers' ``unit``, after their own ``convert``). A rule without ``unit`` is taken as
    written in the channel's unit. Raises ``ValueError`` naming ``where`` when the channel's
    unit differs between devices the rule watches or no conversion is known."""
    if not rule.unit:
        return rule
    units = {
        reg.unit
        for dev in devices
        if not rule.machines or dev.name in rule.machines
        for reg in getattr(dev, "registers", ())
        if reg.name == rule.channel and reg.unit
    }
    if not units:
        raise ValueError(f"{where}.unit: channel {rule.channel!r} has no unit to convert to")
    if len(units) > 1:
        raise ValueError(
            f"{where}.unit: channel {rule.channel!r} has different units on the devices the "
            f"rule watches ({sorted(units)}): split the rule by `machines`"
        )
    (target,) = units
    if target == rule.unit:
        return rule
    try:
        a, b = conversion(f"{rule.unit}->{target}")
    except UnknownConversion:
        raise ValueError(
            f"{where}.unit: no conversion from {rule.unit!r} to the channel's unit {target!r}"
        ) from None
    if rule.rule_kind == "rate":  # a rate converts without the offset

        def conv(x: float | None) -> float | None:
            return None if x is None else a * x

    else:

        def conv(x: float | None) -> float | None:
            return None if x is None else a * x + b

    if a < 0:
        raise ValueError(f"{where}.unit: {rule.unit!r}->{target!r} reverses the order")
    return msgspec.structs.replace(
        rule,
        unit=target,
        above=conv(rule.above),
        clear_below=conv(rule.clear_below),
        below=conv(rule.below),
        clear_above=conv(rule.clear_above),
        escalate_above=conv(rule.escalate_above),
        tolerance=abs(a) * rule.tolerance,
    )


def _prepare_device(raw: object) -> object:
    """A raw device table before validation: ``protocol`` defaults to Modbus TCP; ``order`` in
    any letter case; inline registers inherit the device's ``order``/``type``."""
    if not isinstance(raw, dict):
        return raw
    dev = {"protocol": DEFAULT_PROTOCOL, **raw}
    if dev["protocol"] in ("modbus_tcp", "modbus_rtu"):
        if isinstance(dev.get("order"), str):
            dev["order"] = dev["order"].upper()
        if "registers" in dev:
            order, type_ = dev.get("order"), dev.get("type")
            dev["registers"] = with_defaults(
                dev["registers"],
                order=order if isinstance(order, str) else None,
                type=type_ if isinstance(type_, str) else None,
            )
    return dev


def _non_finite(value: Any, path: str) -> str | None:
    """The key path of the first non-finite float (TOML allows ``inf``/``nan``) in ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = _non_finite(
            item,
            f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key),
        )
        if where is not None:
            return where
    return None


def _check_sanity(cfg: Config, data: dict[str, Any]) -> None:
    """Refuse what types alone let through: no devices (unless ``appliance.allow_no_devices``),
    an empty host, a non-finite number anywhere (timeouts, thresholds, scales)."""
    if not cfg.devices and not cfg.appliance.allow_no_devices:
        raise ValueError(
            "devices: no device configured (no telemetry, no channel alerts); set "
            "`appliance.allow_no_devices = true` to run without devices on purpose"
        )
    if not cfg.mqtt.host.strip():
        raise ValueError("mqtt.host: must not be empty")
    for i, dev in enumerate(cfg.devices):
        if isinstance(dev, ModbusTcpConfig) and not dev.host.strip():
            raise ValueError(f"devices[{i}] ({dev.name}).host: must not be empty")
    where = _non_finite(data, "")
    if where is not None:
        raise ValueError(f"{where}: must be a finite number (not inf or nan)")


def parse_config(data: dict[str, Any], *, source: str = "<config>", base_dir: Path) -> Config:
    """Validate a decoded TOML document. Raises :class:`ConfigError` naming ``source``."""
    devices = data.get("devices")
    if isinstance(devices, list):  # `protocol` may be omitted: Modbus TCP is the default
        data = {**data, "devices": [_prepare_device(d) for d in devices]}
    try:
        cfg = msgspec.convert(data, Config)
        cfg = _cross_checks(cfg, base_dir)
        _check_sanity(cfg, data)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err, data)}") from None
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    outbox = msgspec.structs.replace(cfg.outbox, path=_resolve(base_dir, cfg.outbox.path))
    state_path = cfg.alerts.state_path
    if state_path:
        state_path = _resolve(base_dir, state_path)
    else:  # beside the outbox: outbox.sqlite -> outbox.alerts.sqlite
        out = Path(outbox.path)
        state_path = str(out.with_name(out.stem + ".alerts.sqlite"))
    alerts = msgspec.structs.replace(cfg.alerts, state_path=state_path)
    model = cfg.engine.model
    if is_path(model):
        model = _resolve(base_dir, model)
    engine = msgspec.structs.replace(
        cfg.engine, model=model, cache_dir=_resolve(base_dir, cfg.engine.cache_dir)
    )
    models = tuple(
        msgspec.structs.replace(b, model=_resolve(base_dir, b.model)) if is_path(b.model) else b
        for b in cfg.models
    )
    mqtt_files = {
        key: _resolve(base_dir, getattr(cfg.mqtt, key))
        for key in ("ca_file", "cert_file", "key_file", "password_file")
        if getattr(cfg.mqtt, key)
    }
    mqtt = msgspec.structs.replace(cfg.mqtt, **mqtt_files)
    cfg = msgspec.structs.replace(
        cfg, outbox=outbox, engine=engine, models=models, mqtt=mqtt, alerts=alerts
    )
    if cfg.downlink.model_keys:  # PEM key files relative to the config file
        keys = tuple(
            k if k.startswith("ed25519:") else _resolve(base_dir, k)
            for k in cfg.downlink.model_keys
        )
        cfg = msgspec.structs.replace(
            cfg, downlink=msgspec.structs.replace(cfg.downlink, model_keys=keys)
        )
    if cfg.api.token_file:
        token_file = _resolve(base_dir, cfg.api.token_file)
        cfg = msgspec.structs.replace(
            cfg, api=msgspec.structs.replace(cfg.api, token_file=token_file)
        )
    return cfg


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror or err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)


def config_to_toml_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain builtins (for logging the effective config and for tests)."""
    out: dict[str, Any] = msgspec.to_builtins(cfg)
    return out
