"""Helpers of the outbox tests (imported as ``outboxhelp``: test folders are not packages).

``APP``: the appliance id in the records' topics. ``FakeClock``: a wall clock the test moves by
hand. ``telemetry(machine, ts, **body)``: a telemetry envelope of ``machine`` at ``ts``.
"""

from __future__ import annotations

from typing import Any

from appliance.contracts import Envelope, Priority

APP = "app-01"


class FakeClock:
    """Wall clock the test moves by hand (seconds, epoch)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def telemetry(machine: str = "cnc-1", ts: float = 1.0, **body: Any) -> Envelope:
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=f"edge/{APP}/telemetry/{machine}",
        priority=Priority.TELEMETRY,
        ts=ts,
        body=body or {"mean": {"rpm": 1200.0}},
    )
