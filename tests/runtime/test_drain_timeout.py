"""`[appliance] drain_timeout_s` bounds how long stop waits for the outbox to drain (issue 10)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from appliance.config import parse_config
from appliance.contracts import Envelope, Priority
from appliance.runtime import Appliance


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_duration(tmp_path: Path, drain_timeout_s: float) -> float:
    port = _closed_port()  # no broker: nothing is ever acked, stop waits the whole deadline
    data = {
        "appliance": {"drain_timeout_s": drain_timeout_s},
        "devices": [{"name": "m", "profile": "cnc-sim", "port": _closed_port()}],
        "outbox": {"path": f"o-{drain_timeout_s}.sqlite"},
        "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.1},
    }
    app = Appliance(parse_config(data, source="t", base_dir=tmp_path))

    took: list[float] = []
    stop = app.stop

    async def timed_stop(*args: float) -> None:
        t0 = time.monotonic()
        await stop(*args)
        took.append(time.monotonic() - t0)

    app.stop = timed_stop  # type: ignore[method-assign]
    app.outbox.open()  # a record left from before: nothing acks it, the drain waits for it
    app.outbox.append([Envelope("alerts/m", "alert", "t", Priority.ALERT, 1.0, {})])
    app.outbox.close()
    asyncio.run(app.run_until_signal(duration_s=0.2))  # as `appliance run` does
    return took[0]


def test_changing_drain_timeout_s_changes_how_long_stop_waits(tmp_path: Path) -> None:
    short = _stop_duration(tmp_path, 0.3)
    long = _stop_duration(tmp_path, 2.0)
    assert 0.3 <= short < 1.5
    assert 2.0 <= long < 4.0
