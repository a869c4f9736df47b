"""A one-line health summary in the log every ``appliance.health_log_s`` seconds, so a person
watching the journal sees that polling is healthy without a metrics stack::

    health: 600 polls, 0 errors, 0 overruns, 20 windows, 2/2 devices online, outbox pending 0

Counts are the differences since the previous line (taken from the stages' own ``stats()``);
``devices online`` and ``outbox pending`` are the state now. Logged at INFO by the supervisor's
task on the event loop; ``0`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("appliance.health")

_COUNTS = ("polls", "errors", "overruns")


def _totals(stats: dict[str, Any]) -> dict[str, int]:
    """Counts since start from :meth:`Appliance.stats`: acquisition (waveform readers'
    errors and overruns included), windows closed."""
    out = dict.fromkeys(_COUNTS, 0)
    for dev in stats.get("acquisition", []):
        for key in _COUNTS:
            out[key] += int(dev.get(key, 0))
        wave = dev.get("waveform") or {}
        out["errors"] += int(wave.get("errors", 0))
        out["overruns"] += int(wave.get("overruns", 0))
    out["windows"] = int(stats.get("windows_closed", 0))
    return out


class HealthLog:
    """Logs :meth:`line` every ``interval_s`` seconds between :meth:`start` and :meth:`stop`
    (``interval_s == 0``: never). ``stats`` returns the appliance's stats dict."""

    def __init__(self, interval_s: float, stats: Callable[[], dict[str, Any]]) -> None:
        self.interval_s = interval_s
        self._stats = stats
        self._last: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def line(self) -> str:
        """The summary since the previous call (since start for the first one)."""
        stats = self._stats()
        totals = _totals(stats)
        delta = {k: v - self._last.get(k, 0) for k, v in totals.items()}
        self._last = totals
        devices = stats.get("acquisition", [])
        online = sum(1 for d in devices if d.get("state") == "online")
        pending = int(stats.get("outbox", {}).get("pending", 0))
        return (
            f"health: {delta['polls']} polls, {delta['errors']} errors, "
            f"{delta['overruns']} overruns, {delta['windows']} windows, "
            f"{online}/{len(devices)} devices online, outbox pending {pending}"
        )

    def start(self) -> None:
        """Start the periodic task (on the event loop). Idempotent; nothing when off."""
        if self.interval_s > 0 and self._task is None:
            self._last = _totals(self._stats())
            self._task = asyncio.create_task(self._run(), name="health log")

    async def stop(self) -> None:
        """Stop the task. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while self._task is not None:
            await asyncio.sleep(self.interval_s)
            try:
                log.info("%s", self.line())
                self._failing = False
            except Exception as err:  # a stats() failure must not stop the appliance
                if not self._failing:
                    self._failing = True
                    log.warning("health summary failed: %r", err)
