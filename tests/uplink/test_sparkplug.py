"""Sparkplug B: the edge node's messages decoded with the protobuf schema itself (the
generated module), and a real Mosquitto delivering birth, data by exception, rebirth on NCMD
and the NDEATH last will of a SIGKILLed node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from appliance.demo.mosquitto import MosquittoProcess
from appliance.uplink import sparkplug_b_pb2 as pb
from appliance.uplink.sparkplug import REBIRTH, DataType, SparkplugNode, metrics_of


def decode(payload: bytes) -> Any:
    p = pb.Payload()
    p.ParseFromString(payload)
    return p


def value(m: Any) -> Any:
    return None if m.is_null else getattr(m, m.WhichOneof("value"))


def test_birth_data_by_exception_and_death_follow_the_specification() -> None:
    node = SparkplugNode("plant", "cell-01", bd_seq=7)
    will_topic, will = node.death(1000)
    assert will_topic == "spBv1.0/plant/NDEATH/cell-01"
    death = decode(will)
    assert not death.HasField("seq") and [(m.name, m.long_value) for m in death.metrics] == [
        ("bdSeq", 7)
    ]
    ((nbirth_topic, nbirth),) = node.birth(1000)
    nb = decode(nbirth)
    assert nbirth_topic == "spBv1.0/plant/NBIRTH/cell-01" and nb.seq == 0
    assert {m.name: value(m) for m in nb.metrics} == {"bdSeq": 7, REBIRTH: False}

    body = {"channels": {"temp": {"n": 10, "mean": 46.5, "max": None}}}
    ((t1, p1),) = node.data("cnc-1", metrics_of("telemetry", body), 2000)
    dbirth = decode(p1)
    assert t1 == "spBv1.0/plant/DBIRTH/cell-01/cnc-1" and dbirth.seq == 1
    by_name = {m.name: m for m in dbirth.metrics}
    assert by_name["temp/mean"].datatype == DataType.Double and value(by_name["temp/mean"]) == 46.5
    assert by_name["temp/n"].datatype == DataType.Int64 and by_name["temp/max"].is_null
    aliases = {m.name: m.alias for m in dbirth.metrics}
    assert len(set(aliases.values())) == 3

    body2 = {"channels": {"temp": {"n": 10, "mean": 47.0, "max": None}}}
    ((t2, p2),) = node.data("cnc-1", metrics_of("telemetry", body2), 3000)
    ddata = decode(p2)
    assert t2 == "spBv1.0/plant/DDATA/cell-01/cnc-1" and ddata.seq == 2
    assert [(m.name, m.alias, m.double_value) for m in ddata.metrics] == [
        ("", aliases["temp/mean"], 47.0)
    ]
    assert node.data("cnc-1", metrics_of("telemetry", body2), 4000) == []  # nothing changed

    ddeath_topic, ddeath = node.device_death("cnc-1", 5000)
    assert ddeath_topic == "spBv1.0/plant/DDEATH/cell-01/cnc-1" and decode(ddeath).seq == 3
    ((t3, _),) = node.data("cnc-1", metrics_of("telemetry", body2), 6000)
    assert t3.startswith("spBv1.0/plant/DBIRTH/")  # back online: born again


def test_seq_wraps_after_255_and_a_new_session_bumps_bd_seq() -> None:
    node = SparkplugNode("g", "n", bd_seq=255)
    node.birth(0)
    seqs = [decode(node.data("d", {"x": float(i)}, i)[0][1]).seq for i in range(300)]
    assert seqs[:3] == [1, 2, 3] and seqs[254] == 255 and seqs[255] == 0
    node.new_session()
    assert decode(node.death(0)[1]).metrics[0].long_value == 0


def test_rebirth_is_requested_only_by_this_nodes_ncmd() -> None:
    node = SparkplugNode("g", "n")
    cmd = pb.Payload(timestamp=1)
    cmd.metrics.add(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True)
    raw = cmd.SerializeToString()
    assert node.wants_rebirth("spBv1.0/g/NCMD/n", raw)
    assert not node.wants_rebirth("spBv1.0/g/NCMD/other", raw)
    assert not node.wants_rebirth("spBv1.0/g/NCMD/n", b"\xff\xff garbage")


NODE = """
import sys, time, threading
import paho.mqtt.client as mqtt
from appliance.uplink.sparkplug import SparkplugNode, metrics_of

port = int(sys.argv[1])
node = SparkplugNode("plant", "cell-01", bd_seq=3)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cell-01")
will_topic, will = node.death(int(time.time() * 1000))
c.will_set(will_topic, will, qos=1)
lock = threading.Lock()

def publish(msgs):
    for t, p in msgs:
        c.publish(t, p, qos=1).wait_for_publish(5)

def on_message(client, userdata, msg):
    if node.wants_rebirth(msg.topic, msg.payload):
        with lock:
            threading.Thread(target=publish, args=(node.birth(int(time.time() * 1000)),)).start()

c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_start()
c.subscribe("spBv1.0/plant/NCMD/cell-01", qos=1)
with lock:
    publish(node.birth(int(time.time() * 1000)))
for mean in (46.0, 46.0, 47.5):
    body = {"channels": {"temp": {"n": 10, "mean": mean}}}
    with lock:
        publish(node.data("cnc-1", metrics_of("telemetry", body), int(time.time() * 1000)))
alert = {"rule": "hot", "state": "raised", "severity": "major", "alert_id": "hot:cnc-1:1",
         "value": 81.0}
with lock:
    publish(node.data("cnc-1", metrics_of("alert", alert), int(time.time() * 1000)))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.broker
def test_a_subscriber_decodes_birth_data_rebirth_and_the_death_of_a_killed_node(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    got: list[tuple[str, Any]] = []
    cond = threading.Condition()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with cond:
            got.append((msg.topic.split("/")[2], decode(msg.payload)))
            cond.notify_all()

    def wait_for(kind: str, count: int = 1) -> None:
        with cond:
            assert cond.wait_for(lambda: sum(k == kind for k, _ in got) >= count, 15), got

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="host")
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("spBv1.0/plant/#", qos=1)
    sub.loop_start()
    time.sleep(0.3)
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(NODE), str(mosquitto.port)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            wait_for("DBIRTH", 2)
            # the repeated 46.0 sent nothing; the alert's metrics are new: a second DBIRTH
            assert [k for k, _ in got] == ["NBIRTH", "DBIRTH", "DDATA", "DBIRTH"]
            cmd = pb.Payload(timestamp=int(time.time() * 1000))
            cmd.metrics.add(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True)
            sub.publish("spBv1.0/plant/NCMD/cell-01", cmd.SerializeToString(), qos=1)
            wait_for("NBIRTH", 2)
            wait_for("DBIRTH", 3)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wait_for("NDEATH")
    sub.loop_stop()
    sub.disconnect()
    births = [p for k, p in got if k == "NBIRTH"]
    death = next(p for k, p in got if k == "NDEATH")
    bd_seq = {m.name: m.long_value for m in births[0].metrics}["bdSeq"]
    assert death.metrics[0].name == "bdSeq" and death.metrics[0].long_value == bd_seq == 3
    assert [p.seq for p in births] == [0, 0]
    first_dbirth = next(p for k, p in got if k == "DBIRTH")
    assert {m.name for m in first_dbirth.metrics} == {"temp/n", "temp/mean"}
    ddata = next(p for k, p in got if k == "DDATA")
    assert [m.double_value for m in ddata.metrics] == [47.5] and not ddata.metrics[0].name
    seqs = [p.seq for k, p in got if k in ("DBIRTH", "DDATA")][:3]
    assert seqs == [1, 2, 3]
