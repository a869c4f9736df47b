"""Fuzz: thousands of random and malformed commands through a real Mosquitto while the
appliance keeps acquiring and publishing telemetry without a sequence gap; every message is
accounted for (refused per reason, or a command that passed the checks)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from dlhelp import DownlinkCell
from paho.mqtt.enums import CallbackAPIVersion

from appliance.demo.subscriber import DemoSubscriber

pytestmark = [pytest.mark.slow, pytest.mark.broker]

N_MESSAGES = 2400
BATCH = 200


def _case(rng: random.Random, i: int) -> tuple[str, bytes, str]:
    """(command, payload, expected outcome: a refusal reason, or "passes")."""
    rid = f"fz-{i}"
    kind = rng.randrange(12)
    if kind == 0:  # random bytes (invalid UTF-8 from the first byte)
        return "status", b"\xff" + rng.randbytes(rng.randrange(0, 300)), "not_json"
    if kind == 1:  # truncated JSON
        text = json.dumps({"request_id": rid, "body": {"alert_id": "x" * rng.randrange(50)}})
        return "alerts.ack", text[: rng.randrange(1, len(text) - 1)].encode(), "not_json"
    if kind == 2:  # JSON that is not an object
        value = rng.choice([1, "s", [1, 2], None, True, 3.5])
        return "status", json.dumps(value).encode(), "not_object"
    if kind == 3:  # bad request ids
        bad = rng.choice(["", "x" * 65, "a/b", "sp ace", 123, None, ["l"], "ü", "nl\n"])
        return "status", json.dumps({"request_id": bad, "body": {}}).encode(), "bad_request_id"
    if kind == 4:  # body of the wrong type / unknown top-level keys
        if rng.random() < 0.5:
            body: Any = rng.choice([[], "x", 5, True])
            doc = {"request_id": rid, "body": body}
        else:
            doc = {"request_id": rid, "body": {}, "extra": 1}
        return "status", json.dumps(doc).encode(), "not_object"
    if kind == 5:  # unknown commands
        cmd = rng.choice(["rm", "shell", "status.x", "config", "..", "STATUS", "a" * 40])
        return cmd, json.dumps({"request_id": rid, "body": {}}).encode(), "unknown_command"
    if kind in (6, 7):  # schema: wrong body field types, unknown or missing fields
        cmd, body = rng.choice(
            [
                ("alerts.ack", {"alert_id": rng.randrange(100)}),
                ("alerts.ack", {}),
                ("alerts.ack", {"alert_id": "a", "evil": "rm -rf /"}),
                ("config.apply", {"config": 5}),
                ("config.apply", {"config": ""}),
                ("config.apply", {}),
                ("rules.apply", {"rules": "all"}),
                ("rules.apply", {"rules": [1, 2]}),
                ("status", {"verbose": True}),
            ]
        )
        return cmd, json.dumps({"request_id": rid, "body": body}).encode(), "schema"
    if kind == 8 and i % 40 == 8:  # huge payloads (a few: each is 300 KB)
        doc = {"request_id": rid, "body": {"config": "x" * 300_000}}
        return "config.apply", json.dumps(doc).encode(), "too_large"
    if kind == 9 and i % 20 == 9:  # a few well-formed ones: executed
        return "status", json.dumps({"request_id": rid, "body": {}}).encode(), "passes"
    if kind == 10 and i % 20 == 10:  # well-formed, refused by the handler
        doc = {"request_id": rid, "body": {"alert_id": f"none:{i}"}}
        return "alerts.ack", json.dumps(doc).encode(), "passes"
    # otherwise: JSON with random structure
    junk = {rng.choice(["a", "b", "request_id"]): rng.random() for _ in range(3)}
    junk["request_id"] = rng.choice([rid + "/x", 7, ""])
    return "status", json.dumps(junk).encode(), "bad_request_id"


def test_thousands_of_malformed_commands_are_refused_and_counted_while_telemetry_flows(
    downlink_cell: DownlinkCell,
) -> None:
    cell = downlink_cell
    rng = random.Random(16)
    cases = [_case(rng, i) for i in range(N_MESSAGES)]
    expected = Counter(outcome for _, _, outcome in cases)
    sub = DemoSubscriber("127.0.0.1", cell.broker.port, "edge", "dl", client_id="fuzz-sub")
    sub.start()
    pub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    pub.connect("127.0.0.1", cell.broker.port)
    pub.loop_start()
    lock = threading.Lock()

    def telemetry_seq() -> int:
        with sub.lock:
            st = sub.streams.get("telemetry/cnc-1")
            return st.last_seq if st is not None else 0

    try:
        cell.wait_for(lambda: telemetry_seq() >= 1, 20, "telemetry")
        seq0, frames0 = telemetry_seq(), cell.stats()["frames"]
        t0 = time.monotonic()
        for start in range(0, N_MESSAGES, BATCH):
            with lock:
                infos = [
                    pub.publish(f"edge/dl/cmd/{cmd}", payload, qos=1)
                    for cmd, payload, _ in cases[start : start + BATCH]
                ]
            for info in infos:
                info.wait_for_publish(10)
            n = min(start + BATCH, N_MESSAGES)
            cell.wait_for(
                lambda n=n: cell.runner.channel is not None and cell.runner.channel.received >= n,
                30,
                f"{n} messages received",
            )
        elapsed = time.monotonic() - t0
        cell.wait_for(
            lambda: cell.runner.channel is not None and cell.runner.channel.stats()["queued"] == 0,
            30,
            "the queue drained",
        )
        # acquisition and publishing went on throughout
        cell.wait_for(lambda: telemetry_seq() >= seq0 + 2, 20, "telemetry after the fuzz")
        stats = cell.stats()
        status = cell.send("status", {})
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.stop()
    dl = stats["downlink"]
    assert dl["received"] == N_MESSAGES
    refused = {k: v for k, v in dl["refused"].items() if v}
    assert refused == {k: v for k, v in expected.items() if k != "passes"}
    assert sum(dl["commands"].values()) == expected["passes"]
    assert dl["received"] == dl["refused_total"] + sum(dl["commands"].values())
    assert stats["frames"] > frames0 + 5 * elapsed  # 10 polls/s of one machine
    with sub.lock:
        gaps = sum(len(s.gaps) for s in sub.streams.values())
    assert gaps == 0
    assert status["code"] == "ok" and status["body"]["ready"] is True
    assert all(d["state"] == "online" for d in status["body"]["devices"])
