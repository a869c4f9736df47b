"""`appliance run` logs a one-line health summary every `appliance.health_log_s` seconds."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.runtime import Appliance
from appliance.runtime.health import HealthLog
from appliance.simulate.cell import SimulatedCell


def test_each_line_counts_what_happened_since_the_previous_one() -> None:
    stats: dict[str, Any] = {
        "acquisition": [
            {"state": "online", "polls": 10, "errors": 0, "overruns": 1},
            {"state": "offline", "polls": 0, "errors": 3, "overruns": 0, "waveform": {"errors": 2}},
        ],
        "windows_closed": 4,
        "outbox": {"pending": 7.0},
    }
    health = HealthLog(60, lambda: stats)
    assert health.line() == (
        "health: 10 polls, 5 errors, 1 overruns, 4 windows, 1/2 devices online, outbox pending 7"
    )
    stats["acquisition"][0]["polls"] = 25
    stats["windows_closed"] = 5
    stats["outbox"]["pending"] = 0
    assert health.line() == (
        "health: 15 polls, 0 errors, 0 overruns, 1 windows, 1/2 devices online, outbox pending 0"
    )


def run_app(tmp_path: Path, health_log_s: float, seconds: float) -> None:
    port = free_port()
    cfg = parse_config(
        {
            "appliance": {"health_log_s": health_log_s},
            "devices": [{"name": "cnc-1", "port": port, "profile": "cnc-sim"}],
            "outbox": {"path": "o.sqlite"},
            "mqtt": {"port": free_port(), "reconnect_min_s": 5.0},
        },
        base_dir=tmp_path,
    )

    async def go() -> None:
        async with SimulatedCell(machines=1, ports=[port]):
            app = Appliance(cfg)
            await app.start()
            try:
                await asyncio.sleep(seconds)
            finally:
                await app.stop(drain_timeout_s=0.5)

    asyncio.run(go())


def test_a_running_appliance_logs_the_summary_at_info_every_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.health")
    run_app(tmp_path, 0.5, 1.8)
    lines = [r for r in caplog.records if r.name == "appliance.health"]
    assert len(lines) >= 2 and all(r.levelno == logging.INFO for r in lines)
    polls = [int(re.match(r"health: (\d+) polls", r.getMessage()).group(1)) for r in lines]  # type: ignore[union-attr]
    assert all(p > 0 for p in polls) and max(polls) < sum(polls)  # deltas, not totals
    assert "1/1 devices online" in lines[-1].getMessage()


def test_health_log_s_0_logs_no_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.health")
    run_app(tmp_path, 0, 0.8)
    assert not [r for r in caplog.records if r.name == "appliance.health"]


def test_the_health_line_reads_the_same_counts_as_stats_without_computing_them(
    tmp_path: Path,
) -> None:
    """The line reads ``health_stats`` (counters only) rather than ``stats`` (jitter
    percentiles of every device: ~30 ms of the event loop at 100 devices, issue 11)."""
    port = free_port()
    cfg = parse_config(
        {
            "devices": [{"name": f"cnc-{i}", "port": port, "profile": "cnc-sim"} for i in (1, 2)],
            "outbox": {"path": "o.sqlite"},
        },
        base_dir=tmp_path,
    )
    app = Appliance(cfg)
    app.outbox.open()
    poller = app.acquisition.pollers[0]
    poller.polls, poller.errors, poller.overruns = 12, 3, 2
    app.windows.windows_closed = 5
    assert HealthLog(1, app.health_stats).line() == HealthLog(1, app.stats).line()
    line = HealthLog(1, app.health_stats).line()
    assert line.startswith("health: 12 polls, 3 errors, 2 overruns")
    app.outbox.close()
