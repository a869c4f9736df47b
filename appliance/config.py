"""The appliance configuration: one TOML file, typed with msgspec and validated once at load.

Every error names the file, the key path and the offending value, e.g.::

    appliance.toml: Invalid enum value 'flaot32' - at `$.devices[0].registers[5].type`

Relative paths in the file (``outbox.path``, ``engine.model``) are resolved against the directory
of the config file. See ``docs/configuration.md`` for every key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from appliance.errors import ConfigError
from drivers.modbus.registers import Register, RegisterMapError, check_register_map, load_profile

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
    id: Name = "appliance-01"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class _DeviceBase(_Section, frozen=True, tag_field="protocol"):
    """Fields every device has. ``protocol`` selects the concrete class (a tagged union)."""

    name: Name
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=1)] = 100
    timeout_s: PositiveFloat = 1.0


class ModbusTcpConfig(_DeviceBase, frozen=True, tag="modbus_tcp"):
    """One Modbus TCP device. Registers come from ``profile`` or are listed inline."""

    host: str = "127.0.0.1"
    port: Port = 502
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1
    profile: str = ""
    registers: tuple[Register, ...] = ()

    def __post_init__(self) -> None:
        if not self.profile and not self.registers:
            raise ValueError("give `profile` (a register-map profile) or `registers`")
        for i, reg in enumerate(self.registers):
            if reg.type == "string":
                raise ValueError(
                    f"registers[{i}] ({reg.name}): string values cannot be channels yet"
                )


#: Every device kind, selected by its ``protocol`` key (default ``modbus_tcp``). New protocols
#: add their config class here.
DeviceConfig = ModbusTcpConfig
DEFAULT_PROTOCOL = "modbus_tcp"


class FeaturesSection(_Section, frozen=True):
    window_s: PositiveFloat = 1.0


class BatchSection(_Section, frozen=True):
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    max_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=60000)] = 20
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 1024


class EngineSection(_Section, frozen=True):
    model: str = "cnc_anomaly"
    backend: Literal["auto", "onnxruntime-cpu"] = "auto"
    threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class ThresholdRule(_Section, frozen=True):
    """Raise when the value goes above ``above``; clear when it falls below ``clear_below``."""

    name: Name
    above: float
    source: Literal["channel", "score"] = "channel"
    channel: str = ""
    clear_below: float | None = None
    severity: Literal["info", "warning", "major", "critical"] = "warning"
    machines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source == "channel" and not self.channel:
            raise ValueError("`channel` is required when source = 'channel'")
        if self.source == "score" and self.channel:
            raise ValueError("`channel` must be empty when source = 'score'")
        if self.clear_below is not None and self.clear_below > self.above:
            raise ValueError(f"clear_below ({self.clear_below}) must be <= above ({self.above})")


class AlertsSection(_Section, frozen=True):
    rules: tuple[ThresholdRule, ...] = ()


class TelemetrySection(_Section, frozen=True):
    enabled: bool = True
    stats: tuple[Literal["mean", "rms", "min", "max", "last"], ...] = ("mean", "min", "max")


class OutboxSection(_Section, frozen=True):
    path: str = "/var/lib/appliance/outbox.sqlite"
    synchronous: Literal["NORMAL", "FULL"] = "FULL"
    disk_budget_mb: PositiveFloat = 256.0


class MqttSection(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    client_id: str = ""
    topic_prefix: Annotated[str, msgspec.Meta(pattern=r"^[^#+]+$")] = "edge"
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 100
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0


class Config(_Section, frozen=True):
    appliance: ApplianceSection = msgspec.field(default_factory=ApplianceSection)
    devices: tuple[DeviceConfig, ...] = ()
    features: FeaturesSection = msgspec.field(default_factory=FeaturesSection)
    batch: BatchSection = msgspec.field(default_factory=BatchSection)
    engine: EngineSection = msgspec.field(default_factory=EngineSection)
    alerts: AlertsSection = msgspec.field(default_factory=AlertsSection)
    telemetry: TelemetrySection = msgspec.field(default_factory=TelemetrySection)
    outbox: OutboxSection = msgspec.field(default_factory=OutboxSection)
    mqtt: MqttSection = msgspec.field(default_factory=MqttSection)


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _cross_checks(cfg: Config) -> Config:
    """Checks that span sections; resolves device profiles into registers."""
    names: dict[str, int] = {}
    devices = []
    for i, dev in enumerate(cfg.devices):
        where = f"devices[{i}]"
        if dev.name in names:
            raise ValueError(f"{where}.name: duplicate device name {dev.name!r}")
        names[dev.name] = i
        if dev.profile:
            if dev.registers:
                raise ValueError(f"{where}: give `profile` or `registers`, not both")
            try:
                dev = msgspec.structs.replace(dev, registers=load_profile(dev.profile))
            except RegisterMapError as err:
                raise ValueError(f"{where}.profile: {err}") from None
        else:
            try:
                check_register_map(dev.registers, f"{where}.registers")
            except RegisterMapError as err:
                raise ValueError(str(err)) from None
        devices.append(dev)
    channels = {reg.name for dev in devices for reg in dev.registers}
    for i, rule in enumerate(cfg.alerts.rules):
        where = f"alerts.rules[{i}]"
        if rule.source == "channel" and rule.channel not in channels:
            raise ValueError(
                f"{where}.channel: {rule.channel!r} is not a register of any device "
                f"(known: {sorted(channels)})"
            )
        for m in rule.machines:
            if m not in names:
                raise ValueError(f"{where}.machines: {m!r} is not a configured device")
    return msgspec.structs.replace(cfg, devices=tuple(devices))


def parse_config(data: dict[str, Any], *, source: str = "<config>", base_dir: Path) -> Config:
    """Validate a decoded TOML document. Raises :class:`ConfigError` naming ``source``."""
    devices = data.get("devices")
    if isinstance(devices, list):  # `protocol` may be omitted: Modbus TCP is the default
        data = {**data, "devices": [
            {"protocol": DEFAULT_PROTOCOL, **d} if isinstance(d, dict) else d for d in devices
        ]}
    try:
        cfg = msgspec.convert(data, Config)
        cfg = _cross_checks(cfg)
    except (msgspec.ValidationError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None
    outbox = msgspec.structs.replace(cfg.outbox, path=_resolve(base_dir, cfg.outbox.path))
    model = cfg.engine.model
    if "/" in model or model.endswith(".onnx"):
        model = _resolve(base_dir, model)
    engine = msgspec.structs.replace(cfg.engine, model=model)
    return msgspec.structs.replace(cfg, outbox=outbox, engine=engine)


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
