"""Acknowledging an alert (the local API's POST /api/v1/alerts/ack)."""

from __future__ import annotations

from pathlib import Path

from test_rules import make, temp_frame

from appliance.alerts import AlertEngine, AlertStore
from appliance.config import ThresholdRule
from appliance.contracts import Envelope


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


def test_acknowledging_through_the_downlink_records_it_and_sends_an_acknowledged_message(
    tmp_path: Path,
) -> None:
    rule = ThresholdRule(name="hot", channel="spindle_temp", above=75, clear_below=65)
    out: list[Envelope] = []
    eng = AlertEngine(
        [rule], out.extend, lambda m: f"edge/x/alerts/{m}", store=AlertStore(tmp_path / "s.sqlite")
    )
    eng.start()
    eng.on_frame(temp_frame("m1", 1.0, 80.0))
    alert_id = str(eng.active()[0]["alert_id"])
    assert eng.acknowledge(alert_id, by="operator-7") is True
    assert [e.body["state"] for e in out] == ["raised", "acknowledged"]
    msg = out[-1].body
    assert msg["acknowledged"] is True and msg["acknowledged_by"] == "operator-7"
    assert msg["transition"] == 2 and msg["alert_id"] == alert_id
    eng.close()
    again = AlertEngine(
        [rule], out.extend, lambda m: f"edge/x/alerts/{m}", store=AlertStore(tmp_path / "s.sqlite")
    )
    again.start()  # the acknowledgement survived the restart
    assert again.acknowledged(alert_id) and again.active()[0]["acknowledged"] is True
    again.on_frame(temp_frame("m1", 2.0, 60.0))
    assert out[-1].body["state"] == "cleared" and out[-1].body["acknowledged"] is True
    again.close()


def test_set_rules_clears_the_alerts_of_removed_rules_and_keeps_the_others() -> None:
    hot = ThresholdRule(name="hot", channel="spindle_temp", above=75, clear_below=65)
    warm = ThresholdRule(name="warm", channel="spindle_temp", above=70, clear_below=60)
    eng, out = make([hot, warm])
    eng.on_frame(temp_frame("m1", 1.0, 80.0))
    assert {a["rule"] for a in eng.active()} == {"hot", "warm"}
    eng.set_rules([hot])
    assert [a["rule"] for a in eng.active()] == ["hot"]
    assert out[-1].body["state"] == "cleared" and out[-1].body["reason"] == "rule_removed"
    eng.set_rules([hot, ThresholdRule(name="new", channel="spindle_temp", above=50)])
    eng.on_frame(temp_frame("m1", 2.0, 81.0))
    assert {a["rule"] for a in eng.active()} == {"hot", "new"}
