"""A config without a model (`engine.model = ""`, no `[[models]]`) is valid: acquisition,
telemetry and threshold alerts run through Mosquitto, nothing is scored, and check-config, the
API and `appliance status` say "no model" (issue 14, item 5)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cellhelp import cell_config, overtemp_cell, serving, wait_for

from appliance.api.status_cli import render
from appliance.cli import main
from appliance.config import parse_config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.errors import ConfigError
from appliance.runtime import Appliance
from appliance.schemas import load_schema

RULE = {"name": "hot", "channel": "spindle_temp", "above": 75.0, "clear_below": 65.0}


def _config(tmp_path: Path, ports: list[int], mqtt_port: int, api_port: int) -> Any:
    return cell_config(
        tmp_path,
        "nomodel",
        ports,
        mqtt_port,
        engine={"model": ""},
        alerts={"rules": [RULE]},
        api={"enabled": True, "port": api_port},
    )


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.slow
def test_without_a_model_telemetry_and_threshold_alerts_run_and_nothing_is_scored(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ports, cell = overtemp_cell()
    api_port = free_port()
    app = Appliance(_config(tmp_path, ports, mosquitto.port, api_port))
    assert app.models == [] and app.engine is None and app.bundle is None
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "nomodel", client_id="nm-sub")
    sub.keep_messages = True
    base = f"http://127.0.0.1:{api_port}"

    async def go() -> tuple[dict[str, Any], dict[str, Any], tuple[int, bytes], bytes]:
        async with serving(cell, app, sub):
            await wait_for(lambda: sub.alerts_raised >= 1, 60, "the threshold alert")
            await wait_for(lambda: app.uplink.connected, 10, "the uplink")
            ready = await asyncio.to_thread(_get, f"{base}/ready")
            _, status = await asyncio.to_thread(_get, f"{base}/api/v1/status")
            _, metrics = await asyncio.to_thread(_get, f"{base}/metrics")
        return app.stats(), json.loads(status), ready, metrics

    stats, status, ready, metrics = asyncio.run(go())
    alerts = [m for m in sub.messages if m["kind"] == "alert"]
    assert (alerts[0]["machine"], alerts[0]["rule"], alerts[0]["state"]) == (
        "cnc-2",
        "hot",
        "raised",
    )
    telemetry = [m for m in sub.messages if m["kind"] == "telemetry"]
    assert {m["machine"] for m in telemetry} == {"cnc-1", "cnc-2"}
    assert all("scores" not in m for m in telemetry)
    for m in sub.messages:
        jsonschema.validate(m, load_schema(m["kind"]))
    assert stats["engine"] is None and stats["batcher"] is None and stats["models"] == {}
    assert stats["feature_rows"] == 0 and stats["windows_closed"] > 0
    assert ready[0] == 200, ready
    assert status["engine"] == {"model": None, "loaded": False, "backend": None, "batcher": None}
    assert "engine   no model: nothing is scored" in render(status)
    assert b'model=""' in metrics and b'backend="none"' in metrics
    assert b"appliance_inference_rows" not in metrics


def test_check_config_accepts_a_config_without_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "a.toml"
    conf.write_text(
        '[[devices]]\nname = "cnc-1"\nhost = "127.0.0.1"\nprofile = "cnc-sim"\n'
        '[engine]\nmodel = ""\n'
        '[[alerts.rules]]\nname = "hot"\nchannel = "spindle_temp"\nabove = 75.0\n'
    )
    assert main(["check-config", str(conf)]) == 0
    assert "no model (nothing is scored)" in capsys.readouterr().out
    assert main(["selftest", "-c", str(conf)]) == 0
    assert "nothing to test" in capsys.readouterr().out


def test_a_score_rule_without_any_model_is_refused_naming_the_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"alerts.rules\[0\] \(s\)\.source: 'score' but no model"):
        parse_config(
            {
                "devices": [{"name": "cnc-1", "profile": "cnc-sim"}],
                "engine": {"model": ""},
                "alerts": {"rules": [{"name": "s", "source": "score", "above": 1.0}]},
            },
            base_dir=tmp_path,
        )
