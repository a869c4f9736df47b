"""``backfill`` end to end: the appliance runs against the simulator with retention on and
publishes through a real Mosquitto; a backfill of a range re-sends exactly the stored windows
of that range (same ids and seqs, ``historical`` set) while live telemetry goes on without a
gap; a range with nothing stored is refused and says what is held."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import Config, parse_config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.downlink import backfill
from appliance.downlink.base import Reply, Request
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


@dataclass
class Ctx:
    """A :class:`~appliance.downlink.base.CommandContext` over one running appliance."""

    appliance: Appliance
    config: Config
    state_dir: Path
    config_path: Path | None = None


class Recorder:
    """A real paho subscriber (QoS 1) that keeps every payload it receives, duplicates too."""

    def __init__(self, port: int, topic: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.port = port
        self.lock = threading.Lock()
        self.got: list[tuple[float, bytes]] = []
        self.subscribed = threading.Event()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((time.time(), bytes(msg.payload)))

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "no SUBACK"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def telemetry(self) -> list[tuple[float, bytes, dict[str, Any]]]:
        with self.lock:
            got = list(self.got)
        out = []
        for t, raw in got:
            m = msgspec.json.decode(raw)
            if m.get("kind") == "telemetry":
                out.append((t, raw, m))
        return out


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def make_config(tmp_path: Path, ports: list[int], mqtt_port: int) -> Config:
    return parse_config(
        {
            "appliance": {"id": "bf"},
            "devices": [
                {"name": f"cnc-{i + 1}", "port": p, "profile": "cnc-sim", "timeout_s": 0.5}
                for i, p in enumerate(ports)
            ],
            "outbox": {"path": "outbox.sqlite", "synchronous": "NORMAL", "keep_delivered_s": 600},
            "mqtt": {"port": mqtt_port, "reconnect_min_s": 0.2, "backfill_rate_per_s": 4},
        },
        source="bf",
        base_dir=tmp_path,
    )


def test_a_backfill_resends_exactly_the_stored_windows_of_the_range_while_live_goes_on(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=5)
    cfg = make_config(tmp_path, ports, mosquitto.port)
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path)
    rec = Recorder(mosquitto.port, "edge/bf/#")
    replies: list[Reply] = []
    marks: dict[str, float] = {}

    def first_pass(machine: str) -> list[dict[str, Any]]:
        return [
            m for t, _, m in rec.telemetry() if m["machine"] == machine and not m.get("historical")
        ]

    async def go() -> None:
        await cell.start()
        rec.start()
        await app.start()
        try:
            await wait_for(lambda: len(first_pass("cnc-1")) >= 8, 30, "8 windows of cnc-1")
            await asyncio.sleep(2.5)  # acknowledged records are settled (kept) within 2 s
            windows = first_pass("cnc-1")
            marks["from"], marks["to"] = windows[2]["ts"], windows[5]["ts"]
            body = {"from": marks["from"], "to": marks["to"], "machines": ["cnc-1"]}
            handle = backfill.COMMANDS["backfill"]
            replies.append(await handle(ctx, Request("backfill", "bf-1", body, time.time())))
            marks["sent"] = time.time()
            future = {"from": time.time() + 3600, "to": time.time() + 7200}
            replies.append(await handle(ctx, Request("backfill", "bf-2", future, time.time())))
            bad = {"from": 10.0, "to": 5.0}
            replies.append(await handle(ctx, Request("backfill", "bf-3", bad, time.time())))
            await wait_for(
                lambda: sum(1 for *_, m in rec.telemetry() if m.get("historical")) >= 4,
                20,
                "the 4 backfilled windows",
            )
            await asyncio.sleep(1.5)  # live keeps flowing; nothing more comes from the backfill
        finally:
            await app.stop()
            await cell.stop()
            rec.stop()

    asyncio.run(go())
    ok, none, bad = replies
    assert ok.code == "accepted" and ok.body["queued"] == 4 and not ok.body["truncated"]
    assert none.code == "refused" and none.body["reason"] == "nothing_stored"
    assert none.body["held"]["records"] > 0
    assert none.body["held"]["oldest_ts"] <= marks["from"]
    assert bad.code == "refused" and bad.body["reason"] == "bad_request"

    got = rec.telemetry()
    original = {m["id"]: raw for _, raw, m in got if not m.get("historical")}
    again = [(t, raw, m) for t, raw, m in got if m.get("historical")]
    expected = [
        m["id"]
        for _, _, m in got
        if not m.get("historical")
        and m["machine"] == "cnc-1"
        and marks["from"] <= m["ts"] <= marks["to"]
    ]
    assert [m["id"] for _, _, m in again] == expected  # exactly the range, in order
    for _, raw, m in again:  # the stored bytes, plus the flag
        assert raw == original[m["id"]][:-1] + b',"historical":true}'
    # live telemetry went on meanwhile, for both machines, without a gap
    for machine in ("cnc-1", "cnc-2"):
        live = [m for t, _, m in got if m["machine"] == machine and not m.get("historical")]
        seqs = [m["seq"] for m in live]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert sum(1 for t, _, m in got if m["machine"] == machine and t > marks["sent"]) >= 2
    stats = app.stats()
    assert stats["uplink"]["backfilled"] == 4 and stats["outbox"]["backfill_queued"] == 4
    assert backfill.stats()["queued"] >= 4
