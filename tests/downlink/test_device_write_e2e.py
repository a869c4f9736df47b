"""``device.write`` end to end through the command channel and a real Mosquitto, against the
simulator: an allowlisted write changes the simulator's register; writes outside the allowlist
(another address, a value out of range, another device) are refused and the registers stay as
they were; a write the machine refuses is an error carrying its exception."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from dlhelp import DownlinkCell
from pymodbus.client import ModbusTcpClient

from appliance.simulate.cell import FAULT_DURATION_REGISTER, FAULT_REQUEST_REGISTER

pytestmark = pytest.mark.slow

# The simulator's fault-duration register (holding 101) keeps what is written to it (it is read
# only when a fault is requested through holding 100), so a write shows in it.
WRITES = [{"device": "cnc-1", "address": FAULT_DURATION_REGISTER, "min": 0, "max": 60}]


def registers(port: int) -> list[int]:
    """Holding 100 (fault request) and 101 (fault duration) of a simulated machine."""
    client = ModbusTcpClient("127.0.0.1", port=port)
    assert client.connect()
    try:
        rr = client.read_holding_registers(FAULT_REQUEST_REGISTER, count=2, device_id=1)
        return [int(v) for v in rr.registers]
    finally:
        client.close()


def test_only_allowlisted_writes_reach_the_simulator(
    downlink_cell_factory: Callable[..., DownlinkCell],
) -> None:
    cell = downlink_cell_factory({"downlink": {"writes": WRITES}}, machines=2)
    one, two = cell.sim.ports
    assert registers(one) == [0, 0] and registers(two) == [0, 0]

    ok = cell.send(
        "device.write", {"device": "cnc-1", "address": FAULT_DURATION_REGISTER, "value": 7}
    )
    assert ok["code"] == "ok", ok
    assert ok["body"]["reply"] == {"function_code": 6, "address": 101, "value": 7}
    assert ok["body"]["read_back"] == 7
    assert registers(one) == [0, 7]

    refused = {
        "other_address": {"device": "cnc-1", "address": FAULT_REQUEST_REGISTER, "value": 1},
        "out_of_range": {"device": "cnc-1", "address": FAULT_DURATION_REGISTER, "value": 61},
        "other_device": {"device": "cnc-2", "address": FAULT_DURATION_REGISTER, "value": 5},
        "unknown_device": {"device": "press-1", "address": FAULT_DURATION_REGISTER, "value": 5},
    }
    replies = {name: cell.send("device.write", body) for name, body in refused.items()}
    assert {k: r["code"] for k, r in replies.items()} == dict.fromkeys(refused, "refused")
    assert {k: r["body"]["reason"] for k, r in replies.items()} == {
        "other_address": "not_allowed",
        "out_of_range": "out_of_range",
        "other_device": "not_allowed",
        "unknown_device": "unknown_device",
    }
    assert registers(one) == [0, 7] and registers(two) == [0, 0]  # untouched

    # the machine answers every request with exception 4 for 2 s: an error with its reply
    cell.on_loop(lambda: cell.sim.inject(0, "exception", 2.0))
    err = cell.send(
        "device.write", {"device": "cnc-1", "address": FAULT_DURATION_REGISTER, "value": 9}
    )
    assert err["code"] == "error", err
    assert err["body"]["reply"]["function_code"] == 0x86
    assert err["body"]["reply"]["exception_code"] == 4
    assert err["body"]["reply"]["exception"] == "server device failure"
    time.sleep(2.5)
    assert registers(one) == [0, 7]

    bad = cell.send("device.write", {"device": "cnc-1", "value": 1})  # schema: no target
    assert bad["code"] == "refused"
    stats = cell.stats()["downlink"]["device_write"]
    assert stats["ok"] >= 1 and stats["refused_not_allowed"] >= 2
    assert stats["refused_out_of_range"] >= 1 and stats["refused_unknown_device"] >= 1
