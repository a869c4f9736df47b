"""Issue 11: while the appliance polls, the event loop runs no outbox write of its own. Appends
(``append_off_loop``) and settles (``settle_soon``) run in the outbox's writer thread, so the
loop never waits for a transaction, an fsync, a WAL checkpoint or SQLite's busy handler; the
loop's connection only reads (``take``). Counted in statements on the loop's connection, not in
time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import Mosquitto

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell
from appliance.uplink.delivery import SETTLE_DELAY_S

WRITES = ("BEGIN", "INSERT", "DELETE", "UPDATE", "REPLACE", "COMMIT", "ROLLBACK", "PRAGMA")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def test_polling_publishing_and_settling_run_no_outbox_write_on_the_loop(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    ports = [free_port() for _ in range(3)]
    cfg = parse_config(
        {
            "devices": [
                {"name": f"cnc-{i + 1}", "port": p, "profile": "cnc-sim", "poll_interval_ms": 100}
                for i, p in enumerate(ports)
            ],
            "outbox": {"path": "o.sqlite"},
            "mqtt": {"port": mosquitto.port},
        },
        base_dir=tmp_path,
    )
    on_loop: list[str] = []
    published: list[float] = []

    async def go() -> None:
        async with SimulatedCell(machines=3, ports=ports, fifo_address=None):
            app = Appliance(cfg)
            await app.start()
            try:
                app.outbox._conn.set_trace_callback(on_loop.append)
                # windows close every second; their acks are settled SETTLE_DELAY_S later
                await asyncio.sleep(SETTLE_DELAY_S + 3.0)
                app.outbox._conn.set_trace_callback(None)
                published.append(app.outbox.stats()["published"])
            finally:
                await app.stop(drain_timeout_s=2.0)

    asyncio.run(go())
    assert published[0] >= 3  # telemetry was appended, published, acked and settled meanwhile
    assert [s for s in on_loop if s.lstrip().upper().startswith(WRITES)] == []
    assert any(s.lstrip().upper().startswith("SELECT") for s in on_loop)  # take() ran there
