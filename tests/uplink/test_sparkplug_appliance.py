"""``mqtt.format = "sparkplug_b"`` end to end: simulated cell → appliance → real Mosquitto →
a host subscriber decoding with the protobuf schema: NBIRTH/DBIRTH, DDATA by exception,
DDEATH when a device goes offline, rebirth on NCMD, NDEATH at stop with the birth's bdSeq."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cellhelp import cell_config, serving, wait_for

from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.runtime import Appliance
from appliance.simulate.cell import FaultSchedule, SimulatedCell
from appliance.uplink import sparkplug_b_pb2 as pb
from appliance.uplink.sparkplug import REBIRTH, DataType

pytestmark = pytest.mark.slow


class Host:
    """A Sparkplug host application: subscribes to the group, decodes every payload."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[str, str, Any]] = []  # (type, device, payload)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="host")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("spBv1.0/plant/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        p = pb.Payload()
        p.ParseFromString(msg.payload)
        if parts[2] == "NCMD":
            return  # our own command
        with self.lock:
            self.got.append((parts[2], parts[4] if len(parts) > 4 else "", p))

    def count(self, kind: str, device: str = "") -> int:
        with self.lock:
            return sum(k == kind and (not device or d == device) for k, d, _ in self.got)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_appliance_speaks_sparkplug_b_to_a_host_through_mosquitto(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(
        machines=2,
        ports=ports,
        seed=5,
        time_scale=3.0,
        faults=[FaultSchedule(machine=1, kind="timeout", at_s=9.0, duration_s=9.0)],
    )
    cfg = cell_config(
        tmp_path,
        "cell-01",
        ports,
        mosquitto.port,
        device={"timeout_s": 0.3},
        alerts={"rules": [{"name": "offline", "kind": "offline", "for_s": 1.0}]},
        mqtt={"format": "sparkplug_b", "sparkplug_group_id": "plant"},
    )
    app = Appliance(cfg)
    host = Host(mosquitto.port)

    async def go() -> None:
        async with serving(cell, app, drain_timeout_s=2.0):
            await wait_for(lambda: host.count("DDATA", "cnc-1") >= 2, 30, "DDATA of cnc-1")
            await wait_for(lambda: host.count("DDEATH", "cnc-2") >= 1, 30, "DDEATH of cnc-2")
            cmd = pb.Payload(timestamp=int(time.time() * 1000))
            cmd.metrics.add(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True)
            host.client.publish("spBv1.0/plant/NCMD/cell-01", cmd.SerializeToString(), qos=1)
            await wait_for(lambda: host.count("NBIRTH") >= 2, 10, "rebirth")
        await wait_for(lambda: host.count("NDEATH") >= 1, 10, "NDEATH at stop")

    try:
        asyncio.run(go())
    finally:
        host.stop()
    got = host.got
    assert got[0][0] == "NBIRTH" and got[0][2].seq == 0
    bd_seq = {m.name: m.long_value for m in got[0][2].metrics}["bdSeq"]
    death = next(p for k, _, p in got if k == "NDEATH")
    assert death.metrics[0].name == "bdSeq" and death.metrics[0].long_value == bd_seq
    first_dbirth = next(p for k, d, p in got if k == "DBIRTH" and d == "cnc-1")
    names = {m.name: m.alias for m in first_dbirth.metrics}
    assert "spindle_temp/mean" in names and len(set(names.values())) == len(names)
    ddata = [p for k, d, p in got if k == "DDATA" and d == "cnc-1"]
    assert all(not m.name and m.alias in names.values() for p in ddata for m in p.metrics)
    # seq: 0 at each NBIRTH, then +1 per message (mod 256), across devices
    seqs = [p.seq for k, _, p in got if k in ("NBIRTH", "DBIRTH", "DDATA", "DDEATH")]
    first_rebirth = [k for k, _, _ in got].index("NBIRTH", 1)
    run = seqs[: sum(1 for k, _, _ in got[:first_rebirth] if k != "NDEATH")]
    assert run == [i % 256 for i in range(len(run))]
    # after its DDEATH a device sends nothing until it is back (a DBIRTH) or a rebirth
    kinds = [(k, d) for k, d, _ in got]
    after = [kd for kd in kinds[kinds.index(("DDEATH", "cnc-2")) + 1 :] if kd[1] != "cnc-1"]
    assert after[0] in (("NBIRTH", ""), ("DBIRTH", "cnc-2"))
    assert app.uplink.stats()["published"] > 0 and app.outbox.pending == 0
