"""``device.write``: one Modbus write to a register on the configuration's allowlist (issue 16).

Request body (``appliance/schemas/cmd/device.write.request.json``)::

    {"device": "cnc-1", "register": "feed_override", "value": 80, "by": "operator-7"}
    {"device": "cnc-1", "address": 40, "table": "holding", "value": 80}

Only a (device, target, value) that an entry of ``[[downlink.writes]]`` allows is written: the
device is named there, the target is the entry's register (by name, or the entry's address in
its table; a request by address matches a register entry at that address and table too), and
the value lies within the entry's ``min``..``max``. A register entry takes values in the
register's engineering unit and writes the raw value that makes the register read it (scale,
offset and ``convert`` undone: :func:`appliance.config.action_raw`, the path of alert actions);
an address entry takes the raw value. Anything else is ``refused`` naming what, counted
(:data:`COUNTERS`, ``refused_<reason>``), and nothing is sent to the device.

The write goes through the device's running driver (the poller's connection, as alert actions
do: FC 6 for a holding register, FC 5 for a coil), bounded by the device's ``timeout_s`` plus
one second. The reply is ``ok`` with the device's answer: the echo it returned (address and
value; the driver checks it) and a read-back of the register (FC 3/1), or ``error`` with the
device's Modbus exception (code and name), a timeout or a lost connection; nothing is retried.
Every request is logged at INFO (who: the request id and the optional ``by``; what; value;
result) and counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from appliance.config import Config, DownlinkWrite, action_raw, write_target
from appliance.downlink.base import CommandContext, Handler, Reply, Request
from drivers.errors import MODBUS_EXCEPTION_NAMES, DeviceException, DeviceUnavailable

log = logging.getLogger(__name__)

COUNTERS: Counter[str] = Counter()
"""Outcomes since the process started: ``ok``, ``error``, ``refused`` and ``refused_<reason>``
(``bad_request``, ``unknown_device``, ``not_allowed``, ``out_of_range``, ``not_representable``,
``not_running``)."""

_EXTRA_TIMEOUT_S = 1.0  # on top of the device's timeout_s: the driver's own timeout answers first


def stats() -> dict[str, int]:
    """A copy of :data:`COUNTERS`."""
    return dict(COUNTERS)


@dataclass(frozen=True)
class _Target:
    """What a request asks to write, resolved against the allowlist."""

    device: str
    register: str  # "" when addressed by address only
    table: str  # "holding" or "coil"
    address: int
    type: str  # "uint16", "int16" or "bool"


def _refused(reason: str, message: str, body: dict[str, Any] | None = None) -> Reply:
    COUNTERS["refused"] += 1
    COUNTERS[f"refused_{reason}"] += 1
    return Reply("refused", message, {"reason": reason, **(body or {})})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _check(cfg: Config, body: Any) -> tuple[_Target, float, int | bool] | Reply:
    """The target, the value and the raw value to write; or a refusal."""
    if not isinstance(body, dict):
        return _refused("bad_request", "body must be an object")
    device, register, address = body.get("device"), body.get("register"), body.get("address")
    table = body.get("table", "holding")
    value = _number(body.get("value"))
    if not isinstance(device, str) or not device:
        return _refused("bad_request", "`device` (a device name) is required")
    if (register is None) == (address is None):
        return _refused("bad_request", "give `register` (a name) or `address`, exactly one")
    if register is not None and not isinstance(register, str):
        return _refused("bad_request", "`register` must be a string")
    if address is not None and (
        isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 65535
    ):
        return _refused("bad_request", "`address` must be an integer 0..65535")
    if table not in ("holding", "coil") or (register is not None and "table" in body):
        return _refused("bad_request", "`table` is `holding` or `coil`, and only with `address`")
    if value is None:
        return _refused("bad_request", "`value` must be a finite number")
    dev = next((d for d in cfg.devices if d.name == device), None)
    if dev is None:
        return _refused(
            "unknown_device",
            f"device {device!r} is not configured (devices: {[d.name for d in cfg.devices]})",
        )
    regs = getattr(dev, "registers", ())
    reg = None
    if register is not None:
        reg = next((r for r in regs if r.name == register), None)
        if reg is None:
            return _refused("not_allowed", f"device {device} has no register {register!r}")
        want = (reg.table, reg.address)
    else:
        want = (table, address)
    entries: list[tuple[DownlinkWrite, tuple[str, int, str]]] = []
    for entry in cfg.downlink.writes:
        if entry.device != device or bool(entry.register) != (register is not None):
            continue  # a request names its target as the entry does: by register or address
        target = write_target(entry, cfg.devices)  # checked at load: cannot raise here
        if entry.register == register or (target[0], target[1]) == want:
            entries.append((entry, target))
    what = f"{device} {register if register is not None else f'{table} {address}'}"
    if not entries:
        return _refused(
            "not_allowed", f"{what} is not on the allowlist (downlink.writes)", {"device": device}
        )
    within = [(e, t) for e, t in entries if e.min <= value <= e.max]
    if not within:
        ranges = ", ".join(f"{e.min:g}..{e.max:g}" for e, _ in entries)
        return _refused(
            "out_of_range",
            f"{what} = {value:g} is outside the allowed range ({ranges})",
            {"device": device, "value": value},
        )
    entry, (t_table, t_address, t_type) = within[0]
    if entry.register:  # engineering units: the register's scale/offset/convert undone
        ereg = reg if reg is not None else next(r for r in regs if r.name == entry.register)
        try:
            raw: int | bool = action_raw(ereg, value)
        except ValueError as err:
            return _refused("not_representable", f"{what} = {value:g}: {err}")
        name = ereg.name
    else:
        if value != int(value):
            return _refused("not_representable", f"{what}: raw value {value:g} is not whole")
        raw = bool(value) if t_table == "coil" else int(value)
        name = register if register is not None else ""
    return _Target(device, name, t_table, t_address, t_type), value, raw


async def device_write(ctx: CommandContext, request: Request) -> Reply:
    """Handle ``device.write`` (see the module docstring)."""
    cfg = ctx.config
    checked = _check(cfg, request.body)
    by = request.body.get("by", "") if isinstance(request.body, dict) else ""
    who = f"request {request.request_id}" + (f" by {by}" if by else "")
    if isinstance(checked, Reply):
        log.info("device.write %s refused: %s", who, checked.message)
        return checked
    target, value, raw = checked
    what = f"{target.device} {target.register or target.table} (" + (
        f"{target.table} {target.address}) = {value:g} (raw {int(raw)})"
    )
    app = ctx.appliance
    poller = next((p for p in app.acquisition.pollers if p.name == target.device), None)
    if poller is None or not app.running:
        COUNTERS["refused"] += 1
        COUNTERS["refused_not_running"] += 1
        log.info("device.write %s refused: %s is not being polled", who, target.device)
        return Reply("refused", f"device {target.device} is not running", {"reason": "not_running"})
    driver: Any = poller.driver
    dev = next(d for d in cfg.devices if d.name == target.device)
    timeout_s = dev.timeout_s + _EXTRA_TIMEOUT_S
    body: dict[str, Any] = {
        "device": target.device,
        "table": target.table,
        "address": target.address,
        "value": value,
        "raw": int(raw),
    }
    if target.register:
        body["register"] = target.register
    function_code = 5 if target.table == "coil" else 6
    word = int(raw) & 0xFFFF  # an int16 goes on the wire as its two's complement
    try:
        if target.table == "coil":
            await asyncio.wait_for(driver.write_coil(target.address, bool(raw)), timeout_s)
        else:
            await asyncio.wait_for(driver.write_register(target.address, word), timeout_s)
    except DeviceException as err:
        code = err.exception_code
        body["reply"] = {
            "function_code": function_code | 0x80,
            "exception_code": code,
            "exception": MODBUS_EXCEPTION_NAMES.get(code, "malformed reply" if not code else "?"),
        }
        return _failed(who, what, f"the device refused the write: {err}", body)
    except (DeviceUnavailable, asyncio.TimeoutError, OSError) as err:
        why = str(err) or f"no answer within {timeout_s:g} s"
        return _failed(who, what, f"the write failed: {type(err).__name__}: {why}", body)
    body["reply"] = {"function_code": function_code, "address": target.address, "value": int(raw)}
    try:  # a cheap read-back: the register as the device holds it now (raw, signed for int16)
        (back,) = await asyncio.wait_for(
            driver.read_raw(target.table, target.address, 1), timeout_s
        )
        body["read_back"] = back - 0x10000 if target.type == "int16" and back >= 0x8000 else back
    except Exception as err:  # noqa: BLE001 - the write succeeded; the read-back is a bonus
        body["read_back_error"] = f"{type(err).__name__}: {err}"
    COUNTERS["ok"] += 1
    log.info("device.write %s: wrote %s: ok (read back %s)", who, what, body.get("read_back"))
    return Reply("ok", f"wrote {what}", body)


def _failed(who: str, what: str, message: str, body: dict[str, Any]) -> Reply:
    COUNTERS["error"] += 1
    log.warning("device.write %s: writing %s failed: %s", who, what, message)
    return Reply("error", message, body)


COMMANDS: dict[str, Handler] = {"device.write": device_write}
