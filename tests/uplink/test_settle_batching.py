"""Flash wear (issue 10): acknowledged records are settled together, a few windows' acks per
outbox transaction, never published twice while they wait."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Mosquitto
from mqtt_helpers import (
    APP,
    PREFIX,
    Subscriber,
    await_condition,
    eventually,
    mqtt_cfg,
    outbox,
    run_with_uplink,
    telemetry,
)

from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink
from appliance.uplink.delivery import SETTLE_DELAY_S

__all__ = ["outbox"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]


def test_acks_of_several_window_closes_are_settled_in_one_transaction(
    mosquitto: Mosquitto, outbox: SqliteOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    settles: list[int] = []
    settle = outbox.settle

    def counted(accepted: list[int], rejected: list[int] = []) -> None:  # noqa: B006
        settles.append(len(accepted))
        settle(accepted, rejected)

    monkeypatch.setattr(outbox, "settle", counted)
    uplink = MqttUplink(mqtt_cfg(mosquitto.port), APP, outbox)
    closes, machines = 8, 4

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        for i in range(closes):  # a window close every 0.1 s: all acked within SETTLE_DELAY_S
            outbox.append([telemetry(f"cnc-{m}", i=i) for m in range(machines)])
            up.notify()
            await asyncio.sleep(0.1)
        await eventually(lambda: outbox.pending == 0, timeout_s=SETTLE_DELAY_S + 5)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, scenario)
        await_condition(lambda: len(sub.messages()) >= closes * machines)
        assert len(sub.messages()) == closes * machines  # nothing published twice
    assert sum(settles) == closes * machines
    assert len(settles) <= 2  # one per ack burst (8 or more) before; 2 tolerates a slow host
