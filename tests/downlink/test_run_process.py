"""``appliance run`` with ``downlink.enabled`` as a real process (the runner behind the CLI),
commanded with ``appliance cmd``; SIGTERM stops both cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.demo.mosquitto import MosquittoProcess
from appliance.downlink.tomlfile import dumps

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_appliance_run_answers_commands_and_stops_on_sigterm(
    mosquitto: MosquittoProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        dumps(
            {
                "appliance": {"id": "proc", "allow_no_devices": True, "drain_timeout_s": 1.0},
                "outbox": {"path": "state/outbox.sqlite", "synchronous": "NORMAL"},
                "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2},
                "downlink": {"enabled": True},
            }
        )
    )
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "-c", str(cfg), "--stats-json", str(stats)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 40
        rc = 2
        while rc != 0 and time.monotonic() < deadline and proc.poll() is None:
            rc = main(["cmd", "-c", str(cfg), "status", "--timeout", "2"])
        out = capsys.readouterr().out
        assert rc == 0, out
        reply = json.loads(out[out.rindex('{\n  "request_id"') :])
        assert reply["code"] == "ok" and reply["body"]["appliance"]["id"] == "proc"
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log[-3000:]
    assert "downlink: command channel stopped" in log
    assert json.loads(stats.read_text())["downlink"]["codes"]["ok"] >= 1
