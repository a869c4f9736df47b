"""systemd's service notification protocol (``sd_notify``), without a dependency.

The appliance's unit is ``Type=notify`` with ``WatchdogSec=``: systemd considers the service
started only when it sends ``READY=1`` (after every stage started, so ``systemctl start`` and
``appliance update`` wait for a pipeline that really runs), and restarts it when no
``WATCHDOG=1`` arrives within the watchdog interval. The keep-alive is sent by a task on the
event loop itself, so a loop that is blocked (a stuck callback, a deadlock) stops feeding the
watchdog and systemd restarts the process; a thread would keep feeding a dead loop.

Outside systemd (``$NOTIFY_SOCKET`` unset: a terminal, the tests, a container) every call is a
no-op. Sends never block (a receiver whose queue is full makes the send fail instead of
stalling the event loop). A send that fails (the socket went away, a full queue) is logged
once and never raised: notification is advisory, the pipeline must not stop because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The keep-alive period: half of ``$WATCHDOG_USEC`` (what ``sd_watchdog_enabled`` says),
    or ``None`` when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET`` (a path or, with a leading ``@``, an
    abstract socket name). ``environ`` is a seam for tests (default: ``os.environ``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + addr[1:] if addr.startswith("@") else addr) or None
        self.watchdog_s = watchdog_interval_s(env)
        self.sent = 0
        self._failed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one datagram (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``).
        True when sent; False when off or when the send failed (logged once)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # never stall the event loop on a full socket queue
                sock.connect(self.address)
                sock.send(message.encode())
        except OSError as err:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), err)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> None:
        """``READY=1`` (with ``STATUS=`` when given), then start the watchdog task."""
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self.start_watchdog()

    def start_watchdog(self) -> None:
        """Feed ``WATCHDOG=1`` from a task on the running loop every half interval. Idempotent;
        nothing when the unit has no watchdog."""
        if self.enabled and self.watchdog_s is not None and self._task is None:
            self._task = asyncio.create_task(self._feed(self.watchdog_s), name="sd watchdog")

    async def _feed(self, period_s: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(period_s)

    def stopping(self) -> None:
        """``STOPPING=1``: the stop began. The watchdog keeps being fed while stages drain."""
        self.notify("STOPPING=1")

    async def close(self) -> None:
        """Stop the watchdog task (at the end of the stop). Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
