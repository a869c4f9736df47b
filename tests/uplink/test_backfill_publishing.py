"""Records queued by ``backfill`` (``Priority.BACKFILL``) against a real Mosquitto: published
at ``mqtt.backfill_rate_per_s``, flagged ``historical``, byte for byte the delivered ones, and
behind every live record: live telemetry and alerts appended during a backfill go out at once."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
from conftest import Mosquitto
from mqtt_helpers import (
    APP,
    PREFIX,
    Subscriber,
    alert,
    await_condition,
    eventually,
    mqtt_cfg,
    run_with_uplink,
    telemetry,
)

from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink


def test_a_backfill_drains_at_its_rate_behind_live_records_which_are_not_delayed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    n, rate = 40, 20.0
    ob = SqliteOutbox(
        str(tmp_path / "o.sqlite"), appliance_id=APP, synchronous="NORMAL", keep_delivered_s=600
    )
    ob.open()
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, backfill_rate_per_s=rate), APP, ob)
    marks: dict[str, float] = {}
    backfilled_then: list[int] = []

    def historical() -> list[dict[str, object]]:
        return [m for m in sub.messages() if m.get("historical")]

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected, timeout_s=5)
        ob.append([telemetry("cnc-1", i) for i in range(n)])  # live: published once
        up.notify()
        await eventually(lambda: ob.stats()["delivered"] == n, timeout_s=10)  # settled, kept
        queued, cursor = ob.requeue_delivered(0.0, 2e9, limit=1000)
        assert (queued, cursor) == (n, None)
        up.notify()
        await eventually(lambda: len(historical()) >= 10, timeout_s=5)
        marks["live"] = time.monotonic()
        ob.append([telemetry("cnc-2", 0), alert("cnc-2")])
        up.notify()
        await eventually(lambda: len(sub.messages("/cnc-2")) == 2, timeout_s=2)
        marks["live_rx"] = time.monotonic()
        backfilled_then.append(len(historical()))
        await eventually(lambda: ob.pending == 0, timeout_s=10)

    try:
        with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/#") as sub:
            run_with_uplink(uplink, scenario)
            await_condition(lambda: len(historical()) == n)
            timed = sub.timed()
            with sub._lock:
                raws = [p for _, p, _ in sub._messages]
    finally:
        ob.close()
    first = [m for _, m in timed if m.get("stream") == "telemetry/cnc-1"][:n]
    again = [(t, m) for t, m in timed if m.get("historical")]
    assert [m["id"] for _, m in again] == [m["id"] for m in first]  # all of them, in order
    assert all("historical" not in m for m in first)
    originals = {
        msgspec.json.decode(r).get("id"): r for r in raws if b'"historical"' not in r
    }  # (the retained status has no id)
    for r in raws:
        if b'"historical"' in r:
            assert r == originals[msgspec.json.decode(r)["id"]][:-1] + b',"historical":true}'
    measured = (n - 11) / (again[-1][0] - again[10][0])  # after the small initial burst
    assert 0.75 * rate <= measured <= 1.1 * rate, f"{measured:.1f} msg/s"
    assert marks["live_rx"] - marks["live"] < 0.5  # live telemetry and the alert: at once
    assert backfilled_then[0] < n - 5  # they overtook the rest of the backfill
    live = [m for _, m in timed if m.get("stream", "").endswith("cnc-2")]
    assert all("historical" not in m for m in live)
    assert uplink.stats()["backfilled"] == n
