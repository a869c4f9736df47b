"""With ``freeze_gc`` (``appliance run``), what ``Appliance.start`` built is moved out of the
cyclic garbage collector's generations (``gc.freeze``), so a full collection while polling scans
only what the pipeline allocated since (issue 11: a full collection held the loop 50-60 ms at 100
devices), and full collections are made rarer (generation 2's threshold); ``stop`` undoes both."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.runtime import Appliance
from appliance.runtime.supervisor import GC_GEN2_THRESHOLD
from appliance.simulate.cell import SimulatedCell


def test_start_freezes_what_it_built_and_stop_unfreezes_it(tmp_path: Path) -> None:
    port = free_port()
    cfg = parse_config(
        {
            "devices": [{"name": "cnc-1", "port": port, "profile": "cnc-sim"}],
            "outbox": {"path": "o.sqlite"},
            "mqtt": {"port": free_port(), "reconnect_min_s": 5.0},
        },
        base_dir=tmp_path,
    )
    frozen: list[int] = []
    thresholds: list[tuple[int, int, int]] = []
    before = gc.get_threshold()

    async def go() -> None:
        async with SimulatedCell(machines=1, ports=[port]):
            unfrozen = Appliance(cfg)
            await unfrozen.start()  # the default: nothing frozen (the test suite runs many)
            frozen.append(gc.get_freeze_count())
            await unfrozen.stop(drain_timeout_s=0.5)
            app = Appliance(cfg, freeze_gc=True)  # as `appliance run` builds it
            assert gc.get_freeze_count() == 0
            await app.start()
            try:
                frozen.append(gc.get_freeze_count())
                thresholds.append(gc.get_threshold())
                await asyncio.sleep(0.3)
            finally:
                await app.stop(drain_timeout_s=0.5)
            frozen.append(gc.get_freeze_count())
            thresholds.append(gc.get_threshold())

    asyncio.run(go())
    assert frozen[0] == 0
    assert frozen[1] > 10_000  # the modules, config, engine... of the running appliance
    assert frozen[2] == 0
    # full collections rarer while it runs (issue 11), Python's thresholds back after stop
    assert thresholds[0] == (before[0], before[1], max(before[2], GC_GEN2_THRESHOLD))
    assert thresholds[0][2] >= 100 and thresholds[1] == before
