"""The command channel end to end: simulated cell → appliance (downlink enabled) → Mosquitto →
a requester (``appliance cmd``'s client)."""

from __future__ import annotations

import jsonschema
import pytest
from dlhelp import DownlinkCell

from appliance.downlink.schemas import load_cmd_schema

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
