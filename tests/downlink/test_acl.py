"""The Mosquitto ACL of docs/mqtt.md ("Commands") on a real broker with passwords: the appliance
(user = its id) runs and answers, an operator's commands get replies, anyone else's never reach
the appliance."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dlhelp import DownlinkCell

from appliance.demo.mosquitto import MosquittoProcess
from appliance.downlink.client import Broker, CommandTimeout, send_command

pytestmark = [pytest.mark.slow, pytest.mark.broker]

REPO = Path(__file__).resolve().parents[2]


def docs_acl(appliance_id: str) -> str:
    text = (REPO / "docs" / "mqtt.md").read_text()
    block = re.search(r"Mosquitto \(`acl_file`\).*?\n```\n(.*?)```", text, re.S)
    assert block is not None, "no ACL example in docs/mqtt.md"
    return block.group(1).replace("cell-01", appliance_id)


def test_the_documented_acl_lets_only_operators_command_the_appliance(
    mosquitto: MosquittoProcess,
    downlink_cell_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    acl = tmp_path / "acl"
    acl.write_text(docs_acl("dl"))
    pw = tmp_path / "passwd"
    for i, (user, secret) in enumerate([("dl", "s-dl"), ("operator", "s-op"), ("eve", "s-e")]):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(pw), user, secret], check=True)
    mosquitto.reconfigure(f"password_file {pw}\nacl_file {acl}\n", allow_anonymous=False)
    secret_file = tmp_path / "dl-password"
    secret_file.write_text("s-dl\n")
    secret_file.chmod(0o600)
    cell: DownlinkCell = downlink_cell_factory(
        {"mqtt": {"username": "dl", "password_file": str(secret_file)}}
    )
    operator = Broker("127.0.0.1", mosquitto.port, "edge", "5", "operator", "s-op")
    reply = send_command(operator, "dl", "status", {}, timeout_s=20)
    assert reply["code"] == "ok" and reply["body"]["ready"] is True
    eve = Broker("127.0.0.1", mosquitto.port, "edge", "5", "eve", "s-e")
    with pytest.raises(CommandTimeout):
        send_command(eve, "dl", "status", {}, timeout_s=2)
    assert cell.stats()["downlink"]["received"] == 1  # eve's request never reached it
    assert "s-dl" not in str(reply) and "s-dl" not in caplog.text  # never a secret
    assert "downlink: reply ok to status" in caplog.text
