"""Every key of the config schema changes what the running appliance uses (issue 9, defect 1).

The schema is walked with msgspec's introspection (sections, the device tagged union, nested
tables and arrays of tables). Every key path must have a probe in :data:`PROBES`, and every probe
must name a key that exists: a new key without a probe fails
:func:`test_every_schema_key_has_a_probe`.

A probe builds :class:`~appliance.runtime.Appliance` (no I/O in its constructor) from a small
default config and from the same config with that one key changed, and asserts that what the
built pipeline uses differs:

* ``FP`` (the default getter): a fingerprint of every stage the supervisor built (pollers,
  drivers, transports, outbox, batcher, windows, telemetry, engine choice...), walking their
  attributes but *not* the config structs they keep. A key that only sits in a config struct
  nobody reads leaves the fingerprint unchanged and fails.
* ``held(getter, package)``: for keys a stage reads from the config section it keeps, when it
  starts or connects (the MQTT uplink, alert rules, the CLI's log level). The getter reads the
  value from the stage's own reference (``app.uplink._cfg``) and the probe also asserts that the
  consuming package's source reads that key (``.keepalive_s``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import inspect
import json
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import numpy as np
import pytest

from appliance.config import Config, parse_config
from appliance.downlink.channel import CommandChannel
from appliance.downlink.runner import DownlinkRunner
from appliance.runtime import Appliance

REPO = Path(__file__).resolve().parents[2]
DELETE = object()

# -- walking the schema ----------------------------------------------------------------------


def schema_keys() -> list[str]:
    """Every key path of :class:`Config`: ``devices[]<modbus_tcp>.registers[].scale``."""
    out: list[str] = []

    def walk(t: Any, prefix: str) -> None:
        if isinstance(t, mi.Metadata):
            walk(t.type, prefix)
        elif isinstance(t, mi.StructType):
            for f in t.fields:
                walk(f.type, f"{prefix}.{f.name}" if prefix else f.name)
        elif isinstance(t, (mi.ListType, mi.VarTupleType)) and isinstance(
            t.item_type, (mi.StructType, mi.UnionType)
        ):
            walk(t.item_type, prefix + "[]")
        elif isinstance(t, mi.UnionType) and any(isinstance(x, mi.StructType) for x in t.types):
            structs = [x for x in t.types if isinstance(x, mi.StructType)]
            tagged = [s for s in structs if s.tag is not None]
            if tagged:
                out.append(f"{prefix}.{tagged[0].tag_field}")
            for s in structs:
                walk(s, f"{prefix}<{s.tag}>" if s.tag is not None else prefix)
        else:
            out.append(prefix)

    walk(mi.type_info(Config), "")
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (schema notation; ``[]`` is element 0, ``<tag>`` ignored) in ``data``."""
    parts = re.sub(r"<[^>]*>", "", path).split(".")
    node: Any = data
    for part in parts[:-1]:
        key, _, idx = part.partition("[")
        node = node.setdefault(key, [{}] if idx else {})
        if idx:
            node = node[0]
    key = parts[-1]
    if value is DELETE:
        node.pop(key, None)
    else:
        node[key] = value


# -- the default configs ---------------------------------------------------------------------

REGS = [
    {"name": "a", "address": 0, "type": "float32"},
    {"name": "b", "address": 4, "table": "holding"},
    {"name": "c", "address": 0, "table": "coil", "type": "bool"},
    {"name": "d", "address": 3, "table": "coil", "type": "bool"},
]
DEVICES: dict[str, dict[str, Any]] = {
    "modbus_tcp": {"name": "m", "protocol": "modbus_tcp", "registers": REGS, "waveform": {}},
    "modbus_rtu": {"name": "m", "protocol": "modbus_rtu", "port": "/dev/ttyX", "registers": REGS},
    "haas_q": {
        "name": "m",
        "protocol": "haas_q",
        "host": "h",
        "variables": [{"name": "x", "var": 1}],
    },
    "line": {
        "name": "m",
        "protocol": "line",
        "host": "h",
        "columns": ["t", "p"],
        "channels": [{"name": "t"}],
    },
}


def base_config(path: str) -> dict[str, Any]:
    tag = m.group(1) if (m := re.search(r"<([^>]*)>", path)) else "modbus_tcp"
    return {
        "devices": [copy.deepcopy(DEVICES[tag])],
        "alerts": {"rules": [{"name": "r", "channel": "a", "above": 1.0}]},
        "outbox": {"path": "o.sqlite"},
    }


# -- getters ---------------------------------------------------------------------------------


def fingerprint(obj: Any, seen: set[int] | None = None) -> Any:
    """What the built stages hold: primitives, arrays, driver structs, and the attributes of
    objects from ``appliance``/``drivers``; appliance config structs are left out (a key that
    only sits there is not used)."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (str, int, float, bool, bytes, enum.Enum)):
        return obj
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, msgspec.Struct):
        if type(obj).__module__ == "appliance.config":
            return "<config>"
        return (type(obj).__name__, fingerprint(msgspec.structs.asdict(obj), seen))
    if isinstance(obj, deque):
        return ("deque", obj.maxlen, tuple(fingerprint(x, seen) for x in obj))
    if isinstance(obj, (list, tuple)):
        return tuple(fingerprint(x, seen) for x in obj)
    if isinstance(obj, (set, frozenset)):
        return tuple(sorted(repr(fingerprint(x, seen)) for x in obj))
    if isinstance(obj, dict):
        return tuple((fingerprint(k, seen), fingerprint(v, seen)) for k, v in obj.items())
    module = type(obj).__module__
    if isinstance(obj, asyncio.Queue):
        return ("Queue", obj.maxsize)
    if not module.startswith(("appliance", "drivers")) or inspect.isroutine(obj):
        return type(obj).__name__
    if id(obj) in seen:
        return "<seen>"
    seen.add(id(obj))
    attrs: dict[str, Any] = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    if dataclasses.is_dataclass(obj):
        attrs.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return (type(obj).__name__, tuple((k, fingerprint(v, seen)) for k, v in sorted(attrs.items())))


Getter = Callable[[Appliance], Any]


def FP(app: Appliance) -> Any:
    return fingerprint({k: v for k, v in vars(app).items() if k != "cfg"})


class held:
    """A key the stage reads from the config section it keeps: the value the stage holds, and
    the package that reads it must contain ``.<key>``."""

    def __init__(self, get: Getter, package: str) -> None:
        self.get = get
        self.package = package

    def __call__(self, app: Appliance) -> Any:
        return self.get(app)


@dataclasses.dataclass
class P:
    path: str
    value: Any
    get: Getter = FP
    base: dict[str, Any] = dataclasses.field(default_factory=dict)  # set in both configs
    also: dict[str, Any] = dataclasses.field(default_factory=dict)  # set with the change


def uplink(key: str) -> held:
    return held(lambda a: getattr(a.uplink._cfg, key), "appliance/uplink")


def api(key: str) -> held:
    return held(lambda a: getattr(a.api.cfg, key), "appliance/api")


API_ON = {"api.enabled": True}
DOWNLINK_ON = {"downlink.enabled": True}


def _channel(app: Appliance) -> CommandChannel:
    channel = DownlinkRunner(app.cfg).channel
    assert channel is not None
    return channel


def rule(key: str) -> held:
    return held(lambda a: getattr(a.alerts.rules[0], key), "appliance/alerts")


LOW = {"alerts.rules[].kind": "low", "alerts.rules[].above": DELETE, "alerts.rules[].below": 1.0}
STUCK = {"alerts.rules[].kind": "stuck", "alerts.rules[].above": DELETE}


TLS = {"mqtt.tls": True}


def write(key: str) -> held:
    return held(lambda a: getattr(a.cfg.downlink.writes[0], key), "appliance/downlink")


WRITE_REG = {"downlink.writes": [{"device": "m", "register": "b", "min": 0, "max": 10}]}
WRITE_ADDR = {"downlink.writes": [{"device": "m", "address": 4, "min": 0, "max": 10}]}
TWO_DEVICES = {
    "devices": [
        copy.deepcopy(DEVICES["modbus_tcp"]),
        {**copy.deepcopy(DEVICES["modbus_tcp"]), "name": "m2", "port": 1503},
    ]
}
DEV_COMMON = [
    ("name", "other"),
    ("poll_interval_ms", 250),
    ("timeout_s", 2.5),
]
MODBUS_COMMON = [
    ("registers[].name", "z"),
    ("registers[].address", 10),
    ("registers[].type", "int32"),
    ("registers[].table", "input"),
    ("registers[].order", "CDAB"),
    ("registers[].scale", 2.0),
    ("registers[].offset", 1.0),
    ("registers[].unit", "degC"),
    ("registers[].convert", "degF->degC"),
    ("registers[].group", "slow"),
    ("max_gap", 8),
    ("max_registers", 3),
    ("max_bits", 2),
    ("stale_after_s", 1.0),
    ("order", "cdab"),  # inherited by `a` (float32, no order of its own)
    ("type", "int16"),  # inherited by `b` (no type of its own)
]
TEXT_COMMON = [
    ("host", "other-host"),
    ("port", 4002),
    ("baudrate", 19200),
    ("bytesize", 7),
    ("parity", "E"),
    ("stopbits", 2),
    ("xonxoff", True),
    ("rtscts", True),
]


def device_probes() -> list[P]:
    out: list[P] = []
    for tag in DEVICES:
        d = f"devices[]<{tag}>"
        rename_rule = {"alerts.rules[].channel": DELETE, "alerts.rules[].source": "score"}
        out += [P(f"{d}.{k}", v) for k, v in DEV_COMMON]
        if tag.startswith("modbus"):
            out += [
                P(f"{d}.{k}", v, also=rename_rule if k == "registers[].name" else {})
                for k, v in MODBUS_COMMON
                if k not in ("registers[].group", "max_registers", "max_bits")
            ]
            out += [
                P(
                    f"{d}.registers[].group",
                    "slow",
                    also={f"{d}.groups": {"fast": 100, "slow": 900}},
                ),
                P(f"{d}.groups", {"fast": 300}),
                P(f"{d}.max_registers", 3, base={f"{d}.max_gap": 8}),
                P(f"{d}.max_bits", 2, base={f"{d}.max_gap": 8}),
                P(f"{d}.registers[].bit", 3, base={f"{d}.registers[].type": "bit"}),
                P(
                    f"{d}.registers[].length",
                    6,
                    base={
                        f"{d}.registers[].type": "string",
                        f"{d}.registers[].length": 4,
                        "alerts.rules[].channel": "b",
                    },
                ),
                P(
                    f"{d}.profile",
                    "cnc-sim",
                    also={f"{d}.registers": DELETE, "alerts.rules[].channel": "spindle_temp"},
                ),
            ]
        else:
            out += [
                P(
                    f"{d}.{k}",
                    v,
                    base={f"{d}.host": DELETE, f"{d}.serial_port": "/dev/ttyX"}
                    if k not in ("host", "port")
                    else {},
                )
                for k, v in TEXT_COMMON
            ]
            out.append(P(f"{d}.serial_port", "/dev/ttyY", also={f"{d}.host": DELETE}))
    tcp, rtu = "devices[]<modbus_tcp>", "devices[]<modbus_rtu>"
    out += [
        P(f"{tcp}.host", "10.0.0.9"),
        P(f"{tcp}.port", 1502),
        P(f"{tcp}.unit_id", 7),
        P(f"{tcp}.client", "pymodbus"),
        P(f"{tcp}.waveform.channel", "vib"),
        P(f"{tcp}.waveform.address", 300),
        P(f"{tcp}.waveform.capacity", 60),
        P(f"{tcp}.waveform.table", "holding"),
        P(f"{tcp}.waveform.interval_ms", 20),
        P(f"{tcp}.waveform.max_skew_s", 1.0),
        P(f"{rtu}.port", "/dev/ttyY"),
        P(f"{rtu}.unit_id", 9),
        P(f"{rtu}.baudrate", 9600),
        P(f"{rtu}.bytesize", 7),
        P(f"{rtu}.parity", "N"),
        P(f"{rtu}.stopbits", 2),
        P(f"{rtu}.inter_frame_gap_ms", 10.0),
        P(f"{rtu}.local_echo", True),
        P(
            "devices[].protocol",
            "modbus_rtu",
            also={"devices[].port": "/dev/ttyX", "devices[].waveform": DELETE},
        ),
    ]
    haas, line = "devices[]<haas_q>", "devices[]<line>"
    no_rule = {"alerts.rules": DELETE}
    out += [
        P(f"{haas}.command_prefix", "", base=no_rule),
        P(f"{haas}.variables[].name", "y", base=no_rule),
        P(f"{haas}.variables[].var", 2, base=no_rule),
        P(f"{haas}.variables[].scale", 2.0, base=no_rule),
        P(f"{haas}.variables[].offset", 1.0, base=no_rule),
        P(f"{haas}.parts_channel", "parts", base=no_rule),
        P(f"{haas}.running_channel", "run", base=no_rule),
        P(f"{haas}.query_mode", False, base=no_rule),
        P(f"{line}.format", "kv", base=no_rule, also={f"{line}.columns": DELETE}),
        P(f"{line}.columns", ["p", "t"], base=no_rule),
        P(f"{line}.separator", ";", base=no_rule),
        P(f"{line}.pair_separator", ",", base=no_rule),
        P(f"{line}.kv_separator", ":", base=no_rule),
        P(f"{line}.comment", ";", base=no_rule),
        P(f"{line}.channels[].name", "temp", base=no_rule, also={f"{line}.channels[].key": "t"}),
        P(f"{line}.channels[].key", "p", base=no_rule),
        P(f"{line}.channels[].scale", 2.0, base=no_rule),
        P(f"{line}.channels[].offset", 1.0, base=no_rule),
        P(f"{line}.max_line_bytes", 64, base=no_rule),
        P(f"{line}.silence_timeout_s", 3.0, base=no_rule),
    ]
    for p in out:  # text devices have no channel "a": drop the alert rule there
        if "<haas_q>" in p.path or "<line>" in p.path:
            p.base = {**no_rule, **p.base}
    return out


PROBES: list[P] = [
    P("appliance.id", "box-2"),
    P("appliance.health_log_s", 0),
    P(
        "appliance.drain_timeout_s",
        3.0,
        held(lambda a: a.cfg.appliance.drain_timeout_s, "appliance/runtime"),
    ),
    # read by the load-time check (tests/config: a config without devices is refused unless set)
    P(
        "appliance.allow_no_devices",
        True,
        held(lambda a: a.cfg.appliance.allow_no_devices, "appliance/config.py"),
    ),
    P(
        "appliance.log_level",
        "debug",
        held(lambda a: a.cfg.appliance.log_level, "appliance/cli.py"),
    ),
    *device_probes(),
    P(
        "features.window_s",
        2.0,
        lambda a: a.windows.window_s,
        also={"engine.model": "__model_2s__"},
    ),
    P("batch.max_batch", 8),
    P("batch.max_delay_ms", 50),
    P("batch.queue_size", 16),
    P("engine.model", "__model_2s__", also={"features.window_s": 2.0}),
    P("engine.backend", "onnxruntime-cpu"),
    P("engine.threads", 2),
    P("engine.cache_dir", "/tmp/elsewhere"),
    P("api.enabled", True),
    P("api.history_s", 30.0),
    P("api.listen", "0.0.0.0", base=API_ON),
    P("api.port", 9999, base=API_ON),
    P("api.max_body_bytes", 4096, api("max_body_bytes"), base=API_ON),
    P("api.refresh_ms", 5000, api("refresh_ms"), base=API_ON),
    P("api.token_file", "/etc/appliance/token", api("token_file"), base=API_ON),
    # the command channel is built by the runner that owns the pipeline (appliance/downlink)
    P("downlink.enabled", True, lambda a: DownlinkRunner(a.cfg).channel is not None),
    P(
        "downlink.max_payload_bytes",
        4096,
        held(lambda a: _channel(a)._dl.max_payload_bytes, "appliance/downlink"),
        base=DOWNLINK_ON,
    ),
    P("downlink.dedup_keep", 5, lambda a: _channel(a)._store.keep, base=DOWNLINK_ON),
    P(
        "downlink.apply_deadline_s",
        2.0,
        held(lambda a: a.cfg.downlink.apply_deadline_s, "appliance/downlink"),
    ),
    # read by the model.release handler from the running config (appliance/downlink)
    P(
        "downlink.model_keys",
        ["ed25519:" + "A" * 43 + "="],
        held(lambda a: a.cfg.downlink.model_keys, "appliance/downlink"),
    ),
    P(
        "downlink.max_model_bytes",
        4096,
        held(lambda a: a.cfg.downlink.max_model_bytes, "appliance/downlink"),
    ),
    P(
        "downlink.keep_models",
        5,
        held(lambda a: a.cfg.downlink.keep_models, "appliance/downlink"),
    ),
    P("engine.precision", "fp16"),
    P("engine.workspace_mb", 256),
    P("alerts.rules[].name", "r2", rule("name")),
    P("alerts.rules[].above", 5.0, rule("above")),
    P("alerts.rules[].source", "score", also={"alerts.rules[].channel": DELETE}),
    P("alerts.rules[].channel", "b", rule("channel")),
    P("alerts.rules[].clear_below", 0.5, rule("clear_below")),
    P("alerts.rules[].severity", "critical", rule("severity")),
    P("alerts.rules[].machines", ["m"], rule("machines")),
    P(
        "alerts.rules[].kind",
        "low",
        lambda a: a.alerts.rules[0].rule_kind,
        also={"alerts.rules[].above": DELETE, "alerts.rules[].below": 1.0},
    ),
    P("alerts.rules[].below", 0.5, rule("below"), base=LOW),
    P("alerts.rules[].clear_above", 2.0, rule("clear_above"), base=LOW),
    P("alerts.rules[].for_s", 5.0, lambda a: a.alerts.rules[0].duration_s, base=STUCK),
    P("alerts.rules[].tolerance", 0.5, rule("tolerance"), base=STUCK),
    P(
        "alerts.rules[].unit",
        "degF",
        rule("unit"),
        base={"devices[].registers[].unit": "degC"},
    ),
    P("alerts.rules[].debounce_k", 2, rule("debounce_k"), base={"alerts.rules[].debounce_n": 3}),
    P("alerts.rules[].debounce_n", 3, rule("debounce_n")),
    P("alerts.rules[].min_active_s", 2.0, rule("min_active_s")),
    P("alerts.rules[].cooldown_s", 2.0, rule("cooldown_s")),
    P("alerts.rules[].escalate_above", 5.0, rule("escalate_above")),
    P("alerts.rules[].escalate_severity", "major", rule("escalate_severity")),
    P("alerts.rules[].update_interval_s", 0.0, rule("update_interval_s")),
    P("alerts.rules[].evidence_samples", 10, rule("evidence_samples")),
    P("alerts.writable", ["b"]),
    P(
        "alerts.rules[].suppressed_by",
        ["r2"],
        rule("suppressed_by"),
        base={
            "alerts.rules": [
                {"name": "r", "channel": "a", "above": 1.0},
                {"name": "r2", "kind": "offline"},
            ]
        },
    ),
    P(
        "alerts.rules[].action.register",
        "d",
        held(lambda a: a.alerts.rules[0].action, "appliance/runtime"),
        base={
            "alerts.writable": ["b", "d"],
            "alerts.rules[].action": {"register": "b", "value": 1},
        },
    ),
    P(
        "alerts.rules[].action.value",
        2.0,
        held(lambda a: a.alerts.rules[0].action, "appliance/runtime"),
        base={"alerts.writable": ["b"], "alerts.rules[].action": {"register": "b", "value": 1}},
    ),
    P(
        "alerts.rules[].action.on_clear",
        0.0,
        held(lambda a: a.alerts.rules[0].action, "appliance/runtime"),
        base={"alerts.writable": ["b"], "alerts.rules[].action": {"register": "b", "value": 1}},
    ),
    P(
        "alerts.state_path",
        "/tmp/elsewhere.sqlite",
        held(lambda a: a.alerts._store.path, "appliance/runtime/supervisor.py"),
    ),
    P(
        "alerts.rules[].model",
        "y",
        held(lambda a: a.alerts._score_rules[0].model, "appliance/alerts"),
        base={
            "models": [
                {"name": "x", "model": "__model_a__"},
                {"name": "y", "model": "__model_a__"},
            ],
            "alerts.rules[].source": "score",
            "alerts.rules[].channel": DELETE,
        },
    ),
    P("models[].name", "y", base={"models[].name": "x", "models[].model": "__model_a__"}),
    P(
        "models[].model",
        "__model_a_std__",
        base={"models[].name": "x", "models[].model": "__model_a__"},
    ),
    P(
        "models[].machines",
        ["m"],
        base={
            "models[].name": "x",
            "models[].model": "__model_a__",
            "devices": [
                copy.deepcopy(DEVICES["modbus_tcp"]),
                {**copy.deepcopy(DEVICES["modbus_tcp"]), "name": "m2", "port": 1503},
            ],
        },
    ),
    P("telemetry.enabled", False),
    P("telemetry.stats", ["rms"]),
    P("telemetry.interval_s", 10.0),
    P("telemetry.deadband", {"a": 0.5}),
    P("telemetry.max_silence_s", 60.0),
    P("quality.enabled", False),
    P("quality.stale_s", 5.0),
    P("quality.stuck_s", 5.0),
    P("quality.stuck_tolerance", 0.5),
    P("quality.ranges", {"a": [0.0, 1.0]}),
    P("quality.max_clock_skew_s", 1.0),
    P("outbox.path", "other.sqlite"),
    P("outbox.synchronous", "NORMAL"),
    P("outbox.disk_budget_mb", 1.0),
    P("outbox.coarsen_windows", 0),
    P("outbox.keep_delivered_s", 600.0),
    P("mqtt.format", "sparkplug_b", uplink("format")),
    P("mqtt.sparkplug_group_id", "plant", uplink("sparkplug_group_id")),
    P("mqtt.host", "broker", uplink("host")),
    P("mqtt.port", 8883, uplink("port")),
    P("mqtt.client_id", "cid", uplink("client_id")),
    P("mqtt.topic_prefix", "plant"),
    P("mqtt.protocol", "3.1.1", uplink("protocol")),
    P("mqtt.keepalive_s", 60, uplink("keepalive_s")),
    P("mqtt.max_inflight", 5, uplink("max_inflight")),
    P("mqtt.reconnect_min_s", 0.1, uplink("reconnect_min_s")),
    P("mqtt.reconnect_max_s", 5.0, uplink("reconnect_max_s")),
    P("mqtt.tls", True, uplink("tls")),
    P("mqtt.ca_file", "ca.pem", uplink("ca_file"), base=TLS),
    P("mqtt.cert_file", "c.pem", uplink("cert_file"), base=TLS, also={"mqtt.key_file": "k.pem"}),
    P("mqtt.key_file", "k.pem", uplink("key_file"), base=TLS, also={"mqtt.cert_file": "c.pem"}),
    P("mqtt.tls_insecure", True, uplink("tls_insecure"), base=TLS),
    P("mqtt.username", "u", uplink("username")),
    P("mqtt.password_file", "pw", uplink("password_file"), base={"mqtt.username": "u"}),
    P("mqtt.password_env", "PW", uplink("password_env"), base={"mqtt.username": "u"}),
    P("mqtt.session_expiry_s", 60, uplink("session_expiry_s")),
    P("mqtt.backlog_rate_per_s", 50.0),
    P("mqtt.backfill_rate_per_s", 5.0, uplink("backfill_rate_per_s")),
    P("mqtt.historical_after_s", 1.0, uplink("historical_after_s")),
    P("mqtt.max_packet_bytes", 4096, uplink("max_packet_bytes")),
    P("downlink.writes[].device", "m2", write("device"), base={**TWO_DEVICES, **WRITE_REG}),
    P("downlink.writes[].register", "d", write("register"), base=WRITE_REG),
    P("downlink.writes[].address", 5, write("address"), base=WRITE_ADDR),
    P(
        "downlink.writes[].table",
        "coil",
        write("table"),
        base=WRITE_ADDR,
        also={"downlink.writes[].max": 1},
    ),
    P("downlink.writes[].type", "int16", write("type"), base=WRITE_ADDR),
    P("downlink.writes[].min", 1, write("min"), base=WRITE_REG),
    P("downlink.writes[].max", 5, write("max"), base=WRITE_REG),
]


def test_every_schema_key_has_a_probe_and_every_probe_a_key() -> None:
    keys = schema_keys()
    probed = [p.path for p in PROBES]
    assert len(keys) > 140
    missing = sorted(set(keys) - set(probed))
    assert not missing, f"config keys without a probe (add one to PROBES): {missing}"
    assert not sorted(set(probed) - set(keys)), "probes of keys the schema does not have"
    assert len(probed) == len(set(probed)), "a key is probed twice"


@pytest.fixture(scope="module")
def model_2s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped model whose manifest says it was trained on 2 s windows."""
    import shutil

    dst = tmp_path_factory.mktemp("models") / "cnc_anomaly_2s"
    shutil.copytree(REPO / "models" / "cnc_anomaly", dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["window_s"] = 2.0
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def models_a(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small bundles over channel ``a`` of the default device (``[[models]]`` probes)."""
    from appliance.contracts import FeatureSpec
    from appliance.modelkit.export import finish_model, write_bundle
    from appliance.modelkit.gaussian import fit_gaussian

    out = {}
    rng = np.random.default_rng(0)
    for name, stats in (("__model_a__", ("mean", "max")), ("__model_a_std__", ("mean", "std"))):
        x = rng.standard_normal((200, 2))
        model = fit_gaussian(x)
        d = tmp_path_factory.mktemp("models") / name.strip("_")
        write_bundle(
            d,
            name=name.strip("_"),
            version="0",
            description="test",
            onnx_bytes=finish_model(model.onnx_graph("t")),
            features=tuple(FeatureSpec("a", s) for s in stats),
            window_s=1.0,
            golden_inputs=x[:4].astype(np.float32),
            golden_outputs=model.score(x[:4]).astype(np.float32),
            threshold=1.0,
        )
        out[name] = d
    return out


def build(
    data: dict[str, Any], tmp_path: Path, model_2s: Path, models_a: dict[str, Path]
) -> Appliance:
    text = json.dumps(data).replace("__model_2s__", str(model_2s))
    for key, path in models_a.items():
        text = text.replace(key, str(path))
    cfg = parse_config(json.loads(text), base_dir=tmp_path)
    return Appliance(cfg)


@pytest.mark.parametrize("probe", PROBES, ids=[p.path for p in PROBES])
def test_changing_the_key_changes_what_the_appliance_uses(
    probe: P, tmp_path: Path, model_2s: Path, models_a: dict[str, Path]
) -> None:
    default = base_config(probe.path)
    for path, value in probe.base.items():
        set_path(default, path, value)
    changed = copy.deepcopy(default)
    set_path(changed, probe.path, probe.value)
    for path, value in probe.also.items():
        set_path(changed, path, value)
    before = probe.get(build(default, tmp_path, model_2s, models_a))
    after = probe.get(build(changed, tmp_path, model_2s, models_a))
    assert before != after, f"{probe.path} = {probe.value!r} changes nothing the appliance uses"
    if isinstance(probe.get, held):
        key = probe.path.rsplit(".", 1)[-1]
        where = REPO / probe.get.package
        sources = [where] if where.is_file() else sorted(where.rglob("*.py"))
        assert any(re.search(rf"\.{key}\b", f.read_text()) for f in sources), (
            f"{probe.path}: nothing in {probe.get.package} reads `.{key}`"
        )


def test_two_builds_of_one_config_have_the_same_fingerprint(
    tmp_path: Path, model_2s: Path, models_a: dict[str, Path]
) -> None:
    data = base_config("devices[]<modbus_tcp>.name")
    first = FP(build(data, tmp_path, model_2s, models_a))
    assert first == FP(build(data, tmp_path, model_2s, models_a))
