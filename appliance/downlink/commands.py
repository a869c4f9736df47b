"""The channel's own commands: ``status``, ``config.apply``, ``rules.apply``, ``alerts.ack``
(docs/mqtt.md, "Commands"; request schemas in ``appliance/schemas/cmd/``).

``config.apply`` and ``rules.apply`` need the runner that owns the pipeline
(:class:`~appliance.downlink.runner.DownlinkRunner`): with any other context they are refused.
Both validate exactly as a start does (:func:`~appliance.config.parse_config`, then the checks
of ``appliance check-config``: the models load and fit), back the current file up in the state
directory (``config.previous.toml``) and write the new one atomically (temporary file, fsync,
rename).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from appliance.api import views
from appliance.config import Config, parse_config
from appliance.downlink.base import CommandContext, Handler, Reply, Request
from appliance.downlink.tomlfile import dumps, write_atomically
from appliance.errors import ConfigError
from appliance.runtime.checks import config_warnings, served_models

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

BACKUP_FILE = "config.previous.toml"


@runtime_checkable
class PipelineOwner(Protocol):
    """What ``config.apply``/``rules.apply`` need beyond :class:`CommandContext`."""

    rollbacks: int

    def replace_config(self, cfg: Config) -> None: ...

    async def restart_pipeline(self, cfg: Config, deadline_s: float) -> list[str]: ...


async def status(ctx: CommandContext, req: Request) -> Reply:
    """The local API's status document (``views.status``: no secret is part of it)."""
    return Reply("ok", "status", views.status(ctx.appliance))


def _validate(data: dict[str, Any], source: str, base_dir: Path) -> Config:
    """``parse_config`` and the checks of ``check-config`` (models load). ConfigError."""
    cfg = parse_config(data, source=source, base_dir=base_dir)
    try:
        served_models(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def _backup(ctx: CommandContext, path: Path) -> Path:
    backup = ctx.state_dir / BACKUP_FILE
    tmp = backup.with_name(f".{backup.name}.tmp")
    shutil.copyfile(path, tmp)
    write_atomically(backup, tmp.read_text("utf-8"))
    tmp.unlink()
    return backup


async def config_apply(ctx: CommandContext, req: Request) -> Reply:
    """Validate, back up, write, restart in-process; roll back when not ready in time."""
    path = ctx.config_path
    if path is None:
        return Reply("refused", "the appliance was started without a config file")
    if not isinstance(ctx, PipelineOwner):
        return Reply("refused", "config.apply needs the appliance's runner (appliance run)")
    source = f"config.apply (for {path})"
    given = req.body["config"]
    try:
        if isinstance(given, str):
            data = tomllib.loads(given)
            text = given
        else:
            data = dict(given)
            text = dumps(data)
        new = await asyncio.to_thread(_validate, data, source, path.parent)
    except tomllib.TOMLDecodeError as err:
        return Reply("refused", f"{source}: not valid TOML: {err}")
    except (ConfigError, ValueError) as err:
        return Reply("refused", str(err))
    if not new.downlink.enabled:
        return Reply(
            "refused",
            f"{source}: downlink.enabled = false would lock the command channel out; "
            "change that key on the appliance itself",
        )
    if new.appliance.id != ctx.config.appliance.id:
        return Reply(
            "refused",
            f"{source}: appliance.id {new.appliance.id!r} differs from the running "
            f"{ctx.config.appliance.id!r}: the command topics would change",
        )
    old_cfg = ctx.config
    old_text = path.read_text("utf-8")
    await asyncio.to_thread(_backup, ctx, path)
    await asyncio.to_thread(write_atomically, path, text)
    deadline = old_cfg.downlink.apply_deadline_s
    log.info("config.apply %s: %s written, restarting the pipeline", req.request_id, path)
    warnings = config_warnings(new)
    reasons = await ctx.restart_pipeline(new, deadline)
    if not reasons:
        return Reply(
            "ok",
            f"applied: the pipeline runs with the new configuration from {path}",
            {"config_path": str(path), "warnings": warnings},
        )
    why = "; ".join(reasons)
    log.error(
        "config.apply %s: not ready within %s s (%s): rolling back", req.request_id, deadline, why
    )
    await asyncio.to_thread(write_atomically, path, old_text)
    ctx.rollbacks += 1
    back = await ctx.restart_pipeline(old_cfg, max(deadline, 30.0))
    body: dict[str, Any] = {"reasons": reasons, "config_path": str(path)}
    if back:
        body["previous_not_ready"] = back
        log.error(
            "config.apply %s: the previous configuration is not ready either: %s",
            req.request_id,
            "; ".join(back),
        )
    return Reply(
        "rolled_back",
        f"the new configuration was not ready within {deadline} s ({why}); the previous file "
        "was restored and the previous configuration restarted",
        body,
    )


async def rules_apply(ctx: CommandContext, req: Request) -> Reply:
    """Replace ``[alerts] rules`` in the running AlertEngine and in the file, no restart."""
    path = ctx.config_path
    if path is None:
        return Reply("refused", "the appliance was started without a config file")
    if not isinstance(ctx, PipelineOwner):
        return Reply("refused", "rules.apply needs the appliance's runner (appliance run)")
    source = f"rules.apply (for {path})"
    old_text = path.read_text("utf-8")
    try:
        data = tomllib.loads(old_text)
        alerts = dict(data.get("alerts", {}))
        alerts["rules"] = list(req.body["rules"])
        data["alerts"] = alerts
        text = dumps(data)
        new = parse_config(data, source=source, base_dir=path.parent)
    except (ConfigError, ValueError, tomllib.TOMLDecodeError) as err:
        return Reply("refused", str(err))
    app = ctx.appliance
    old_cfg = ctx.config
    old_rules = app.alerts.rules
    try:
        app.alerts.set_rules(new.alerts.rules)
        await asyncio.to_thread(_backup, ctx, path)
        # last step, atomic: when it raises, the file is still the previous one
        await asyncio.to_thread(write_atomically, path, text)
    except Exception as err:  # noqa: BLE001 - rolled back, reported
        log.exception("rules.apply %s failed: rolling back", req.request_id)
        try:
            app.alerts.set_rules(old_rules)
        except Exception:  # noqa: BLE001
            log.exception("rules.apply %s: restoring the previous rules failed", req.request_id)
            return Reply("error", f"applying failed ({err}) and so did restoring the rules")
        ctx.replace_config(old_cfg)
        ctx.rollbacks += 1
        return Reply(
            "rolled_back",
            f"applying the rules failed ({type(err).__name__}: {err}); the previous rules are "
            "in force and the file is unchanged",
        )
    ctx.replace_config(new)
    names = [r.name for r in new.alerts.rules]
    return Reply("ok", f"{len(names)} alert rule(s) in force", {"rules": names})


async def alerts_ack(ctx: CommandContext, req: Request) -> Reply:
    """Acknowledge an active alert: recorded in its state, an ``acknowledged`` alert message."""
    alert_id = str(req.body["alert_id"])
    by = str(req.body.get("by") or "downlink")
    if not ctx.appliance.alerts.acknowledge(alert_id, by=by):
        return Reply("refused", f"no active alert {alert_id!r}")
    log.info("alert %s acknowledged through the downlink by %s", alert_id, by)
    return Reply("ok", f"alert {alert_id} acknowledged", {"alert_id": alert_id, "by": by})


COMMANDS: dict[str, Handler] = {
    "status": status,
    "config.apply": config_apply,
    "rules.apply": rules_apply,
    "alerts.ack": alerts_ack,
}
