"""Acknowledging an alert (the local API's POST /api/v1/alerts/ack)."""

from __future__ import annotations

from test_rules import make, temp_frame

from appliance.config import ThresholdRule


def test_only_an_active_alert_can_be_acknowledged_and_a_new_raise_is_unacknowledged() -> None:
    eng, out = make([ThresholdRule(name="hot", channel="spindle_temp", above=75, clear_below=65)])
    assert eng.acknowledge("hot:m1:0") is False
    eng.on_frame(temp_frame("m1", 1.0, 80.0))
    alert_id = str(eng.active()[0]["alert_id"])
    assert eng.acknowledged(alert_id) is False
    assert eng.acknowledge(alert_id) is True and eng.acknowledged(alert_id) is True
    assert len(out) == 1  # acknowledging sends nothing upstream and clears nothing
    eng.on_frame(temp_frame("m1", 2.0, 60.0))  # cleared
    assert eng.acknowledge(alert_id) is False and eng.acknowledged(alert_id) is False
    eng.on_frame(temp_frame("m1", 3.0, 90.0))  # raised again: a new id, not acknowledged
    new_id = str(eng.active()[0]["alert_id"])
    assert new_id != alert_id and eng.acknowledged(new_id) is False
