"""``backfill`` end to end through the command channel: the appliance runs against the
simulator with retention on and publishes through a real Mosquitto; a backfill of a range
re-sends exactly the stored windows of that range (same ids and seqs, ``historical`` set)
while live telemetry goes on without a gap; a range with nothing stored is refused and says
what is held."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from dlhelp import DownlinkCell
from paho.mqtt.enums import CallbackAPIVersion

pytestmark = pytest.mark.slow


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


def test_a_backfill_resends_exactly_the_stored_windows_of_the_range_while_live_goes_on(
    downlink_cell_factory: Callable[..., DownlinkCell],
) -> None:
    cell = downlink_cell_factory(
        {"outbox": {"keep_delivered_s": 600.0}, "mqtt": {"backfill_rate_per_s": 4.0}}, machines=2
    )
    rec = Recorder(cell.broker.port, f"{cell.prefix}/{cell.appliance_id}/telemetry/#")
    rec.start()
    try:

        def first_pass(machine: str) -> list[dict[str, Any]]:
            return [
                m
                for _, _, m in rec.telemetry()
                if m["machine"] == machine and not m.get("historical")
            ]

        deadline = time.monotonic() + 30
        while len(first_pass("cnc-1")) < 8:
            assert time.monotonic() < deadline, "8 windows of cnc-1 did not arrive"
            time.sleep(0.1)
        time.sleep(2.5)  # acknowledged records are settled (kept) within 2 s
        windows = first_pass("cnc-1")
        lo, hi = windows[2]["ts"], windows[5]["ts"]
        ok = cell.send("backfill", {"from": lo, "to": hi, "machines": ["cnc-1"]})
        sent = time.time()
        future = time.time() + 3600
        none = cell.send("backfill", {"from": future, "to": future + 60})
        bad = cell.send("backfill", {"from": 10.0, "to": 5.0})
        deadline = time.monotonic() + 20
        while sum(1 for *_, m in rec.telemetry() if m.get("historical")) < 4:
            assert time.monotonic() < deadline, "the 4 backfilled windows did not arrive"
            time.sleep(0.1)
        time.sleep(1.5)  # live keeps flowing; nothing more comes from the backfill
        stats = cell.stats()
    finally:
        rec.stop()

    assert ok["code"] == "accepted" and ok["body"]["queued"] == 4, ok
    assert not ok["body"]["truncated"]
    assert none["code"] == "refused" and none["body"]["reason"] == "nothing_stored"
    assert none["body"]["held"]["records"] > 0 and none["body"]["held"]["oldest_ts"] <= lo
    assert bad["code"] == "refused" and bad["body"]["reason"] == "bad_request"
    assert bad["body"]["held"]["records"] > 0

    got = rec.telemetry()
    original = {m["id"]: raw for _, raw, m in got if not m.get("historical")}
    again = [(t, raw, m) for t, raw, m in got if m.get("historical")]
    expected = [
        m["id"]
        for _, _, m in got
        if not m.get("historical") and m["machine"] == "cnc-1" and lo <= m["ts"] <= hi
    ]
    assert [m["id"] for _, _, m in again] == expected  # exactly the range, in order
    for _, raw, m in again:  # the stored bytes, plus the flag
        assert raw == original[m["id"]][:-1] + b',"historical":true}'
    for machine in ("cnc-1", "cnc-2"):  # live telemetry went on meanwhile, without a gap
        live = [(t, m) for t, _, m in got if m["machine"] == machine and not m.get("historical")]
        seqs = [m["seq"] for _, m in live]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert sum(1 for t, _ in live if t > sent) >= 2
    assert stats["uplink"]["backfilled"] == 4 and stats["outbox"]["backfill_queued"] == 4


def test_backfill_is_refused_while_delivered_telemetry_is_not_kept(
    downlink_cell: DownlinkCell,
) -> None:
    reply = downlink_cell.send("backfill", {"from": 0.0, "to": time.time()})
    assert reply["code"] == "refused" and reply["body"]["reason"] == "retention_off"
    assert reply["body"]["held"]["keep_delivered_s"] == 0
