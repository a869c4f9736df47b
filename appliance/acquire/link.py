"""The lifecycle of one device link, shared by the register poller and the waveform reader:
connect, run a session until the transport fails, back off, reconnect, until stopped; and the
deadline grid both schedule their reads on.

Failure handling follows the one-layer-per-concern rule: the driver does the transaction and
raises :class:`~drivers.errors.DeviceUnavailable` when the transport fails (closing its
connection); :class:`LinkTask` reconnects, with capped exponential backoff and full jitter
(:func:`appliance.backoff.backoff_delay_s`). The attempt counter resets only after the link had
been up, so a device that accepts TCP but never answers still backs off.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from appliance.backoff import backoff_delay_s
from drivers.errors import DeviceUnavailable

log = logging.getLogger(__name__)

State = Literal["connecting", "online", "degraded", "offline"]
"""A link's state: ``connecting`` until the first session succeeds or fails, then ``online``,
``degraded`` (answers, but some reads refused or garbled) or ``offline`` (transport failed)."""

GRID_EPS = 1e-9
"""Slack (in intervals) below which a grid point that just passed still counts as "now", so
float rounding of ``t0 + k * interval`` never costs a whole interval."""


def next_deadline(t0: float, phase_s: float, interval_s: float, now: float) -> float:
    """The first point of the grid ``t0 + phase_s + k * interval_s`` (``k >= 0``) at or after
    ``now`` (all monotonic seconds): where a poll loop starts after a (re)connect."""
    deadline = t0 + phase_s
    if deadline < now:
        deadline += math.ceil((now - deadline) / interval_s - GRID_EPS) * interval_s
    return deadline


class LinkTask:
    """One device link run as a task: connect, run a session until the transport fails, back
    off, reconnect, until stopped. The one place reconnects happen (the register poller and the
    waveform reader both derive from it).

    The backoff before reconnect attempt ``n`` is :func:`~appliance.backoff.backoff_delay_s`
    (capped exponential, full jitter); it starts over once the link had been up. Stopping sets a
    flag before cancelling, so a task whose cancellation was lost still ends at its next loop
    turn. Subclasses provide ``_connect``, ``_session``, ``_disconnect`` (idempotent),
    ``_went_down`` and a ``_state``.
    """

    _state: State

    def __init__(
        self,
        what: str,
        *,
        rng: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        backoff_base_s: float,
        backoff_cap_s: float,
    ) -> None:
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ValueError(
                f"need 0 < backoff_base_s <= backoff_cap_s, got {backoff_base_s}, {backoff_cap_s}"
            )
        self._what = what
        self._rng = rng
        self._sleep = sleep
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.errors = 0
        self.reconnects = 0

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _session(self) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    def _went_down(self, err: DeviceUnavailable) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        """Connect, run the session, back off, reconnect; until stopped or cancelled.

        Raises only what the sink or a driver bug raises (never ``DeviceUnavailable``).
        """
        if self._task is not None:
            raise RuntimeError(f"{self._what}: already running")
        self._task = asyncio.current_task()
        attempt = 0
        try:
            while not self._closed:
                try:
                    await self._connect()
                    await self._session()
                except DeviceUnavailable as err:
                    self.errors += 1
                    await self._disconnect()
                    if self._state in ("online", "degraded"):
                        attempt = 0
                    self._went_down(err)
                if self._closed:
                    break
                delay = backoff_delay_s(
                    attempt, self._backoff_base_s, self._backoff_cap_s, self._rng()
                )
                attempt += 1
                log.debug("%s: reconnect attempt %d in %.3f s", self._what, attempt, delay)
                await self._sleep(delay)
                self.reconnects += 1
        finally:
            self._task = None
            await self._disconnect()

    def request_stop(self) -> None:
        """Make :meth:`run` end at its next loop turn, whether or not a cancellation reaches
        it (Python 3.10/3.11's ``wait_for`` can swallow one)."""
        self._closed = True

    async def close(self) -> None:
        """Stop :meth:`run` (flag, then cancel) and close the link. Idempotent."""
        self.request_stop()
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            await cancel_and_wait([task], self._what)
        await self._disconnect()


STOP_WAIT_S = 5.0
"""How long stopping waits for a task to end after cancelling it, per attempt, seconds."""


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]], what: str) -> None:
    """Cancel ``tasks`` and wait for them, re-cancelling stragglers; never waits forever.

    Each loop also checks a stop flag (``request_stop``), so a task whose cancellation was lost
    still ends at its next turn; this bound only guards against a task stuck elsewhere.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(3):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_WAIT_S)
    if pending:
        log.error("%s: %d task(s) did not stop after cancelling; leaving them", what, len(pending))
