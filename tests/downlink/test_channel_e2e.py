"""The command channel end to end: simulated cell → appliance (downlink enabled) → Mosquitto →
a requester (``appliance cmd``'s client)."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from dlhelp import DownlinkCell

from appliance.config import load_config
from appliance.demo.mosquitto import free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.downlink import commands
from appliance.downlink.runner import DownlinkRunner
from appliance.downlink.schemas import load_cmd_schema
from appliance.downlink.tomlfile import dumps
from appliance.schemas import load_schema

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_status_command_answers_with_the_local_api_status_and_no_secret(
    downlink_cell: DownlinkCell,
) -> None:
    reply = downlink_cell.send("status", {}, request_id="st-1")
    jsonschema.validate(reply, load_cmd_schema("reply"))
    assert reply["code"] == "ok" and reply["command"] == "status"
    body = reply["body"]
    assert body["appliance"]["id"] == "dl"
    assert [d["name"] for d in body["devices"]] == ["cnc-1"]
    assert body["ready"] is True
    assert "password" not in str(body).lower()
    dl = downlink_cell.stats()["downlink"]
    assert dl["commands"] == {"status": 1} and dl["codes"] == {"ok": 1}


def test_a_redelivered_request_id_is_executed_once_and_its_stored_reply_sent_again(
    downlink_cell: DownlinkCell,
) -> None:
    first = downlink_cell.send("status", {}, request_id="same-id")
    again = downlink_cell.send("status", {}, request_id="same-id")
    assert first == again  # the stored reply, byte for byte (same ts)
    dl = downlink_cell.stats()["downlink"]
    assert dl["codes"] == {"ok": 1} and dl["duplicates"] == 1 and dl["replies"] == 2


def test_alerts_ack_records_the_acknowledgement_and_sends_an_acknowledged_alert_message(
    downlink_cell: DownlinkCell,
) -> None:
    sub = DemoSubscriber("127.0.0.1", downlink_cell.broker.port, "edge", "dl", client_id="ack-s")
    sub.keep_messages = True
    sub.start()
    try:
        rules = [{"name": "always_hot", "channel": "spindle_temp", "above": -1e9}]
        reply = downlink_cell.send("rules.apply", {"rules": rules})
        assert reply["code"] == "ok", reply
        assert "always_hot" in downlink_cell.config_path.read_text()
        downlink_cell.wait_for(lambda: bool(downlink_cell.app.alerts.active()), 20, "a raise")
        alert_id = str(downlink_cell.on_loop(downlink_cell.app.alerts.active)[0]["alert_id"])
        reply = downlink_cell.send("alerts.ack", {"alert_id": alert_id, "by": "operator-7"})
        assert reply["code"] == "ok", reply
        assert downlink_cell.on_loop(lambda: downlink_cell.app.alerts.acknowledged(alert_id))
        unknown = downlink_cell.send("alerts.ack", {"alert_id": "nope:cnc-1:1"})
        assert unknown["code"] == "refused" and "nope" in unknown["message"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sub.lock:
                acked = [m for m in sub.messages if m.get("state") == "acknowledged"]
            if acked:
                break
            time.sleep(0.05)
    finally:
        sub.stop()
    assert len(acked) == 1
    assert acked[0]["alert_id"] == alert_id and acked[0]["acknowledged_by"] == "operator-7"
    jsonschema.validate(acked[0], load_schema("alert"))


def test_rules_apply_with_a_bad_rule_is_refused_and_changes_nothing(
    downlink_cell: DownlinkCell,
) -> None:
    before = downlink_cell.config_path.read_text()
    rules = [{"name": "bad", "channel": "no_such_channel", "above": 1.0}]
    reply = downlink_cell.send("rules.apply", {"rules": rules})
    assert reply["code"] == "refused" and "no_such_channel" in reply["message"]
    assert downlink_cell.config_path.read_text() == before
    names = downlink_cell.on_loop(lambda: [r.name for r in downlink_cell.app.alerts.rules])
    assert names == ["spindle_overtemp"]


def _telemetry_seq(sub: DemoSubscriber) -> int:
    with sub.lock:
        st = sub.streams.get("telemetry/cnc-1")
        return st.last_seq if st is not None else 0


def _gaps(sub: DemoSubscriber) -> int:
    with sub.lock:
        return sum(len(s.gaps) for s in sub.streams.values())


def test_config_apply_restarts_the_pipeline_in_process_with_the_new_config(
    downlink_cell_factory: Any,
) -> None:
    api_port = free_port()
    downlink_cell: DownlinkCell = downlink_cell_factory(
        {"api": {"enabled": True, "port": api_port}}
    )
    sub = DemoSubscriber("127.0.0.1", downlink_cell.broker.port, "edge", "dl", client_id="ca-s")
    sub.start()
    try:
        downlink_cell.wait_for(lambda: _telemetry_seq(sub) >= 2, 20, "telemetry")
        old_app = downlink_cell.app
        doc = tomllib.loads(downlink_cell.config_path.read_text())
        doc["alerts"]["rules"].append(
            {"name": "cold", "kind": "low", "channel": "coolant_temp", "below": -50.0}
        )
        reply = downlink_cell.send("config.apply", {"config": doc}, timeout_s=60)  # JSON form
        assert reply["code"] == "ok", reply
        assert downlink_cell.app is not old_app
        assert [r.name for r in downlink_cell.app.cfg.alerts.rules] == ["spindle_overtemp", "cold"]
        assert tomllib.loads(downlink_cell.config_path.read_text()) == doc
        backup = downlink_cell.runner.state_dir / "config.previous.toml"
        assert "cold" not in backup.read_text()
        seq = _telemetry_seq(sub)
        downlink_cell.wait_for(lambda: _telemetry_seq(sub) >= seq + 2, 20, "telemetry after")
        # the channel stayed connected and answers with the new pipeline
        status = downlink_cell.send("status", {})
        assert status["code"] == "ok" and status["body"]["ready"] is True
        # the new pipeline's local API took the port over
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/ready", timeout=5) as resp:
            assert resp.status == 200
    finally:
        sub.stop()
    assert _gaps(sub) == 0
    assert downlink_cell.stats()["downlink"]["restarts"] == 1


def test_config_apply_that_never_becomes_ready_rolls_back_and_publishing_goes_on(
    downlink_cell: DownlinkCell,
) -> None:
    sub = DemoSubscriber("127.0.0.1", downlink_cell.broker.port, "edge", "dl", client_id="rb-s")
    sub.start()
    try:
        downlink_cell.wait_for(lambda: _telemetry_seq(sub) >= 2, 20, "telemetry")
        before = downlink_cell.config_path.read_text()
        doc = tomllib.loads(before)
        doc["mqtt"]["port"] = free_port()  # parses and passes every check; never connects
        text = dumps(doc)
        reply = downlink_cell.send("config.apply", {"config": text}, timeout_s=60)  # TOML form
        assert reply["code"] == "rolled_back", reply
        assert "uplink not connected" in reply["message"]
        jsonschema.validate(reply, load_cmd_schema("reply"))
        assert downlink_cell.config_path.read_text() == before
        assert downlink_cell.app.cfg.mqtt.port == downlink_cell.broker.port
        seq = _telemetry_seq(sub)
        downlink_cell.wait_for(lambda: _telemetry_seq(sub) >= seq + 2, 30, "telemetry after")
    finally:
        sub.stop()
    assert _gaps(sub) == 0
    dl = downlink_cell.stats()["downlink"]
    assert dl["restarts"] == 2 and dl["rollbacks"] == 1 and dl["codes"] == {"rolled_back": 1}


def test_config_apply_of_an_invalid_config_is_refused_naming_the_key(
    downlink_cell: DownlinkCell,
) -> None:
    before = downlink_cell.config_path.read_text()
    doc = tomllib.loads(before)
    doc["batch"] = {"max_batch": 0}
    reply = downlink_cell.send("config.apply", {"config": doc})
    assert reply["code"] == "refused" and "batch.max_batch" in reply["message"], reply
    reply = downlink_cell.send("config.apply", {"config": "this is [not toml"})
    assert reply["code"] == "refused" and "not valid TOML" in reply["message"]
    assert downlink_cell.config_path.read_text() == before
    assert downlink_cell.stats()["downlink"]["restarts"] == 0


def test_a_request_id_answered_before_a_process_restart_is_not_executed_after_it(
    downlink_cell: DownlinkCell,
) -> None:
    first = downlink_cell.send("alerts.ack", {"alert_id": "x:cnc-1:1"}, request_id="ack-r1")
    assert first["code"] == "refused"  # executed: the handler refused an unknown alert
    downlink_cell.call(downlink_cell.runner.stop())
    runner = DownlinkRunner(load_config(downlink_cell.config_path), downlink_cell.config_path)
    downlink_cell.runner = runner
    downlink_cell.call(runner.start())
    channel = runner.channel
    assert channel is not None
    downlink_cell.wait_for(channel.subscribed.is_set, 20, "subscribed again")
    again = downlink_cell.send("alerts.ack", {"alert_id": "x:cnc-1:1"}, request_id="ack-r1")
    assert again == first
    dl = downlink_cell.stats()["downlink"]
    assert dl["duplicates"] == 1 and dl["codes"] == {}


def test_rules_apply_rolls_back_when_writing_the_file_fails(
    downlink_cell: DownlinkCell, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, text: str) -> None:  # fault injection: the file cannot be written
        raise OSError(28, "No space left on device")

    before = downlink_cell.config_path.read_text()
    monkeypatch.setattr(commands, "write_atomically", disk_full)
    rules = [{"name": "other", "channel": "spindle_temp", "above": 90.0}]
    reply = downlink_cell.send("rules.apply", {"rules": rules})
    assert reply["code"] == "rolled_back" and "No space left" in reply["message"], reply
    monkeypatch.undo()
    assert downlink_cell.config_path.read_text() == before
    names = downlink_cell.on_loop(lambda: [r.name for r in downlink_cell.app.alerts.rules])
    assert names == ["spindle_overtemp"]  # the running rules were restored


def test_stopping_lets_the_command_under_way_finish_and_answer(
    downlink_cell: DownlinkCell,
) -> None:
    before = downlink_cell.config_path.read_text()
    doc = tomllib.loads(before)
    doc["mqtt"]["port"] = free_port()  # never ready: rolls back after apply_deadline_s (5 s)
    replies: list[dict[str, Any]] = []
    sender = threading.Thread(
        target=lambda: replies.append(
            downlink_cell.send("config.apply", {"config": doc}, timeout_s=60)
        )
    )
    sender.start()
    channel = downlink_cell.runner.channel
    assert channel is not None
    downlink_cell.wait_for(lambda: channel._running is not None, 20, "config.apply under way")
    downlink_cell.call(downlink_cell.runner.stop())
    sender.join(60)
    assert replies and replies[0]["code"] == "rolled_back", replies
    assert downlink_cell.config_path.read_text() == before
