"""``appliance cmd`` against a running appliance through a real Mosquitto: exit codes and the
printed reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dlhelp import DownlinkCell

from appliance.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_cmd_prints_the_reply_and_exits_by_its_code(
    downlink_cell: DownlinkCell, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = str(downlink_cell.config_path)
    assert main(["cmd", "-c", cfg, "status"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["code"] == "ok" and reply["body"]["appliance"]["id"] == "dl"

    body = tmp_path / "ack.json"
    body.write_text(json.dumps({"alert_id": "nope:cnc-1:1"}))
    assert main(["cmd", "-c", cfg, "alerts.ack", "--body-file", str(body)]) == 1
    assert json.loads(capsys.readouterr().out)["code"] == "refused"

    port = downlink_cell.broker.port
    argv = ["--broker", f"127.0.0.1:{port}", "--appliance", "x", "--timeout", "1"]
    assert main(["cmd", "-c", cfg, "status", *argv]) == 2  # no appliance x answers
    assert "no reply" in capsys.readouterr().err


def test_cmd_usage_errors_exit_2(
    downlink_cell: DownlinkCell, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(downlink_cell.config_path)
    assert main(["cmd", "-c", cfg, "status", "--body", "[1, 2]"]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert main(["cmd", "-c", cfg, "status", "--body", "{not json"]) == 2
    assert main(["cmd", "-c", cfg, "status", "--broker", "nohostport"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["cmd", "--help"])
    assert exc.value.code == 0
    assert "request id" in capsys.readouterr().out
