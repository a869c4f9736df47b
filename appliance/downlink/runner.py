"""The process-level owner of the pipeline and of the command channel (``appliance run``).

:class:`DownlinkRunner` builds the :class:`~appliance.runtime.Appliance` from the configuration
and, when ``downlink.enabled``, a :class:`~appliance.downlink.channel.CommandChannel` that
OUTLIVES it: ``config.apply`` stops the running pipeline and starts a new one from the new
configuration in the same process (:meth:`DownlinkRunner.restart_pipeline`) while the channel
stays connected and answers. The runner is the handlers' :class:`CommandContext`.

The channel's own connection settings (``[mqtt]``, ``[downlink]``) are the ones the process
started with; a ``config.apply`` that changes them takes effect for the channel at the next
start of the process (the uplink uses them at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.api.views import readiness
from appliance.config import Config
from appliance.downlink import backfill, device_write
from appliance.downlink.base import Handler
from appliance.downlink.channel import CommandChannel
from appliance.downlink.store import DedupStore
from appliance.runtime import Appliance
from appliance.runtime.supervisor import run_until_signal, state_dir

log = logging.getLogger(__name__)

DEDUP_FILE = "downlink.sqlite"


class DownlinkRunner:
    """Runs the pipeline and the command channel; the :class:`CommandContext` of handlers.

    Construction does no I/O. ``handlers`` defaults to :data:`appliance.downlink.registry.COMMANDS`.
    """

    def __init__(
        self,
        cfg: Config,
        config_path: str | Path | None = None,
        *,
        handlers: Mapping[str, Handler] | None = None,
        freeze_gc: bool = False,
    ) -> None:
        if handlers is None:
            from appliance.downlink.registry import COMMANDS

            handlers = COMMANDS
        self._cfg = cfg
        self._config_path = Path(config_path).resolve() if config_path is not None else None
        self._state_dir = state_dir(cfg)
        self._freeze_gc = freeze_gc  # passed to every pipeline it builds (Appliance)
        self._app = Appliance(cfg, freeze_gc=freeze_gc)
        self.channel: CommandChannel | None = None
        if cfg.downlink.enabled:
            store = DedupStore(self._state_dir / DEDUP_FILE, cfg.downlink.dedup_keep)
            self.channel = CommandChannel(cfg, self, handlers, store)
        self._app.downlink_stats = self.downlink_stats
        self.restarts = 0
        self.rollbacks = 0
        self._stopped = False

    # -- CommandContext ----------------------------------------------------------------------
    @property
    def appliance(self) -> Appliance:
        return self._app

    @property
    def config(self) -> Config:
        return self._cfg

    @property
    def config_path(self) -> Path | None:
        return self._config_path

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pipeline, then the channel (it answers only with a pipeline to act on)."""
        await self._app.start()
        if self.channel is not None:
            await self.channel.start()

    async def stop(self) -> None:
        """Stop the channel (the command under way finishes first, within a bound), then the
        pipeline."""
        if self._stopped:
            return
        self._stopped = True
        if self.channel is not None:
            await self.channel.stop()
        await self._app.stop(self._cfg.appliance.drain_timeout_s)

    async def run_until_signal(self, duration_s: float | None = None) -> None:
        """Run until SIGINT/SIGTERM (or ``duration_s``), then stop cleanly."""
        await run_until_signal(self.start, self.stop, duration_s)

    def stats(self) -> dict[str, Any]:
        """The running pipeline's stats (with ``downlink``)."""
        return self._app.stats()

    def downlink_stats(self) -> dict[str, Any]:
        """``stats()["downlink"]``: the channel's counters and the pipeline restarts."""
        out: dict[str, Any] = {"enabled": self.channel is not None}
        if self.channel is not None:
            out.update(self.channel.stats())
        out["restarts"] = self.restarts
        out["rollbacks"] = self.rollbacks
        out["device_write"] = device_write.stats()  # outcomes and refusals per reason
        out["backfill"] = backfill.stats()
        return out

    # -- used by the handlers ----------------------------------------------------------------
    def replace_config(self, cfg: Config) -> None:
        """The running configuration changed without a restart (``rules.apply``)."""
        self._cfg = cfg
        self._app.cfg = cfg

    async def restart_pipeline(self, cfg: Config, deadline_s: float) -> list[str]:
        """Stop the running pipeline, start one from ``cfg`` and wait up to ``deadline_s`` for
        it to be ready. Returns why it is not ready (empty: ready, and ``cfg`` is now the
        running configuration). A pipeline that fails to start or to become ready is stopped
        again; the caller restores the previous one (:meth:`restart_pipeline` with it)."""
        end = time.monotonic() + deadline_s
        old = self._app
        try:
            await old.stop(self._cfg.appliance.drain_timeout_s, restarting=True)
        except Exception:  # noqa: BLE001 - the new pipeline still gets its chance
            log.exception("downlink: stopping the running pipeline failed; starting the next")
        self.restarts += 1
        try:
            app = Appliance(cfg, freeze_gc=self._freeze_gc)
        except Exception as err:  # noqa: BLE001 - reported to the caller, who rolls back
            return [f"cannot build the pipeline: {type(err).__name__}: {err}"]
        app.downlink_stats = self.downlink_stats
        self._app, self._cfg = app, cfg
        try:
            await asyncio.wait_for(app.start(), max(0.1, end - time.monotonic()))
        except Exception as err:  # noqa: BLE001 - a timeout or a failing stage
            reasons = [f"start failed: {type(err).__name__}: {err}".rstrip(": ")]
        else:
            reasons = await self._wait_ready(app, end)
        if reasons:
            with contextlib.suppress(Exception):
                await app.stop(min(2.0, cfg.appliance.drain_timeout_s), restarting=True)
        return reasons

    @staticmethod
    async def _wait_ready(app: Appliance, end: float) -> list[str]:
        while True:
            reasons = readiness(app)
            if not reasons or time.monotonic() >= end:
                return reasons
            await asyncio.sleep(0.1)
