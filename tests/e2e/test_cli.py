"""The command line as a user runs it: real subprocesses, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import __version__
from appliance.demo.mosquitto import MosquittoProcess, free_port, wait_port
from appliance.demo.subscriber import DemoSubscriber

APPLIANCE = [sys.executable, "-m", "appliance"]


def test_version_and_help_of_every_command() -> None:
    out = subprocess.run([*APPLIANCE, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"appliance {__version__}"
    for cmd in ("run", "check-config", "profile", "simulate", "demo"):
        res = subprocess.run([*APPLIANCE, cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: appliance " + cmd in res.stdout


def test_run_without_config_is_a_usage_error() -> None:
    res = subprocess.run([*APPLIANCE, "run"], capture_output=True, text=True)
    assert res.returncode == 2 and "--config" in res.stderr


@pytest.mark.slow
def test_run_publishes_then_stops_cleanly_on_sigterm(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    port = free_port()
    sim = subprocess.Popen(
        [
            *APPLIANCE,
            "simulate",
            "--machines",
            "1",
            "--base-port",
            str(port),
            "--log-level",
            "warning",
        ]
    )
    cfg = tmp_path / "cell.toml"
    cfg.write_text(
        '[appliance]\nid = "cli"\n'
        f'[[devices]]\nname = "cnc-1"\nport = {port}\nprofile = "cnc-sim"\n'
        '[outbox]\npath = "outbox.sqlite"\n'
        f"[mqtt]\nport = {mosquitto.port}\n"
    )
    sub = DemoSubscriber("127.0.0.1", mosquitto.port, "edge", "cli", client_id="cli-sub")
    app = None
    try:
        wait_port(port)
        sub.start()
        app = subprocess.Popen(
            [*APPLIANCE, "run", "-c", str(cfg)], stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while sub.summary()["telemetry_messages"] < 3:
            assert time.monotonic() < deadline, "no telemetry from `appliance run`"
            assert app.poll() is None, app.stderr.read() if app.stderr else ""
            time.sleep(0.1)
        t0 = time.monotonic()
        app.send_signal(signal.SIGTERM)
        _, err = app.communicate(timeout=20)
        assert app.returncode == 0, err
        assert time.monotonic() - t0 < 15
        assert "appliance stopped" in err
        time.sleep(0.3)
        assert sub.summary()["status"] == "offline"
    finally:
        if app is not None and app.poll() is None:
            app.kill()
            app.communicate()  # reaps it and closes the stderr pipe
        sim.send_signal(signal.SIGINT)
        assert sim.wait(timeout=10) == 0
        sub.stop()


@pytest.mark.slow
def test_demo_on_the_embedded_broker_delivers_every_message_and_the_alert_lifecycle(
    tmp_path: Path,
) -> None:
    """The whole demo on amqtt over MQTT 3.1.1: the fault at t+1 s ramps the spindle for 15 s,
    so the over-temperature alert is raised and cleared within the run."""
    summary = tmp_path / "s.json"
    res = subprocess.run(
        [
            *APPLIANCE,
            "demo",
            "--duration",
            "24",
            "--fault-at",
            "1",
            "--broker",
            "embedded",
            "--machines",
            "2",
            "--summary-json",
            str(summary),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert res.returncode == 0, res.stderr
    s = json.loads(summary.read_text())
    assert s["broker"] == "embedded"
    # 10 s telemetry aggregates: 2 machines x 2-3 intervals (the last one flushed at stop)
    assert s["telemetry_messages"] >= 4
    assert s["alerts_raised"] >= 1 and s["alerts_cleared"] >= 1
    bw = s["bandwidth"]
    assert bw["published_bytes"] > 0 and bw["reduction"] > 0.95  # 25 s: alerts weigh more
    assert bw["reduction"] == 1 - bw["published_bytes"] / bw["raw_json_bytes"]
    assert s["polls"] > 300 and s["published"] >= s["telemetry_messages"]
    assert s["subscriber"]["gaps"] == 0 and s["subscriber"]["bad_messages"] == 0
    assert s["subscriber"]["status"] == "offline"  # the appliance's retained status, at its stop
    assert "demo summary:" in res.stdout
