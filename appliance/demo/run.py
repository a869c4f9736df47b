"""``appliance demo``: simulated CNC cell → appliance → MQTT broker → live subscriber output.

Everything runs in this one process except Mosquitto (a child process when installed; otherwise
the embedded amqtt broker of :mod:`appliance.demo.broker`, from the ``demo`` extra, runs in this
event loop and the appliance speaks MQTT 3.1.1 to it, as amqtt does not speak 5). The appliance
itself is configured exactly as in the field, from a TOML file written to a temporary directory
(printed at start, so it can be copied).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.config import load_config
from appliance.demo.broker import EmbeddedBroker
from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary
from appliance.demo.subscriber import DemoSubscriber
from appliance.runtime import Appliance
from appliance.simulate.cell import FaultSchedule, SimulatedCell

log = logging.getLogger(__name__)

DEMO_ID = "demo-cell"

CONFIG_TEMPLATE = """\
# Written by `appliance demo`: the same format as a field config (see docs/configuration.md).
[appliance]
id = "{appliance_id}"

{devices}
[features]
window_s = 1.0

[batch]
max_batch = 32
max_delay_ms = 20

[engine]
model = "cnc_anomaly"

# One fault, one alert: the model's anomaly alert and a threshold alert on the same machine
# do not both raise (designed suppression); the first one carries the other's evidence.
[[alerts.rules]]
name = "spindle_overtemp"
channel = "spindle_temp"
above = 75.0
clear_below = 65.0
severity = "major"
suppressed_by = ["anomaly"]

[[alerts.rules]]
name = "vibration_high"
channel = "vibration_rms"
above = 9.0
clear_below = 5.0
severity = "warning"
suppressed_by = ["anomaly"]

[[alerts.rules]]
name = "anomaly"
source = "score"
above = 2.0
clear_below = 1.2
severity = "warning"
suppressed_by = ["spindle_overtemp", "vibration_high"]

[telemetry]
interval_s = 10.0
stats = ["mean", "min", "max", "last", "std"]

[outbox]
path = "{outbox}"
synchronous = "NORMAL"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
protocol = "{protocol}"

[api]
enabled = true
port = {api_port}
"""

DEVICE_TEMPLATE = """\
[[devices]]
name = "{name}"
host = "127.0.0.1"
port = {port}
profile = "cnc-sim"
poll_interval_ms = 100
timeout_s = 0.5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="run headless for this long, then exit 0 (default: until Ctrl-C)",
    )
    p.add_argument(
        "--summary-json",
        type=Path,
        metavar="PATH",
        help="write counts of what the subscriber received and what the appliance "
        "polled and published to this JSON file at exit",
    )
    p.add_argument("--machines", type=int, default=4, help="simulated machines (default 4)")
    p.add_argument("--seed", type=int, default=42, help="simulator seed (default 42)")
    p.add_argument(
        "--fault-at",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when to inject the spindle over-temperature fault (default 10)",
    )
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="MQTT broker: mosquitto when installed, else embedded (default auto)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final summary")


def write_config(workdir: Path, ports: list[int], mqtt_port: int, protocol: str) -> Path:
    devices = "\n".join(
        DEVICE_TEMPLATE.format(name=f"cnc-{i + 1}", port=port) for i, port in enumerate(ports)
    )
    text = CONFIG_TEMPLATE.format(
        appliance_id=DEMO_ID,
        devices=devices,
        outbox=workdir / "outbox.sqlite",
        mqtt_port=mqtt_port,
        protocol=protocol,
        api_port=free_port(),
    )
    path = workdir / "appliance.toml"
    path.write_text(text)
    return path


async def _demo(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    def say(line: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    use_mosquitto = args.broker == "mosquitto" or (
        args.broker == "auto" and mosquitto_binary() is not None
    )
    mqtt_port = free_port()
    mosq: MosquittoProcess | None = None
    embedded: EmbeddedBroker | None = None
    if use_mosquitto:
        mosq = MosquittoProcess(mqtt_port, workdir / "mosquitto", persistence=False)
        await asyncio.to_thread(mosq.start)
        broker_name, protocol = "mosquitto", "5"
    else:
        embedded = EmbeddedBroker("127.0.0.1", mqtt_port)
        await embedded.start()
        broker_name, protocol = "embedded", "3.1.1"
    say(f"MQTT broker: {broker_name} on 127.0.0.1:{mqtt_port}")

    ports = [free_port() for _ in range(args.machines)]
    faults = [
        FaultSchedule(
            machine=min(1, args.machines - 1), kind="temp_ramp", at_s=args.fault_at, duration_s=15.0
        )
    ]
    cell = SimulatedCell(machines=args.machines, ports=ports, seed=args.seed, faults=faults)
    config_path = write_config(workdir, ports, mqtt_port, protocol)
    app = Appliance(load_config(config_path))
    sub = DemoSubscriber("127.0.0.1", mqtt_port, app.cfg.mqtt.topic_prefix, DEMO_ID, printer=say)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        await cell.start()
        say(f"simulated cell: {args.machines} CNC machines on Modbus TCP ports {ports}")
        await asyncio.to_thread(sub.start)
        await app.start()
        engine = f"engine {app.engine.backend} [{app.engine.detail}]" if app.engine else "no model"
        say(f"appliance running (config {config_path}); {engine}")
        if app.api is not None:
            print(f"status page: {app.api.url}", flush=True)  # also with --quiet
        say(
            f"subscribed to {sub.topic}; a spindle over-temperature fault hits "
            f"cnc-{faults[0].machine + 1} at t+{args.fault_at:.0f}s. Ctrl-C to stop."
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        say("stopping: acquisition, then draining the outbox")
        await app.stop(drain_timeout_s=5.0)
        await cell.stop()
        await asyncio.sleep(0.3)  # let the last acknowledged messages reach the subscriber
        await asyncio.to_thread(sub.stop)
        if embedded is not None:
            await embedded.stop()
        if mosq is not None:
            await asyncio.to_thread(mosq.stop)
    stats = app.stats()
    received = sub.summary()
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "broker": broker_name,
        "telemetry_messages": received["telemetry_messages"],
        "alerts_raised": received["alerts_raised"],
        "alerts_cleared": received["alerts_cleared"],
        "polls": stats["frames"],
        "published": stats["uplink"].get("published", 0),
        "bandwidth": {
            k: stats["bandwidth"][k] for k in ("published_bytes", "raw_json_bytes", "reduction")
        },
        "subscriber": received,
        "appliance": stats,
    }


def run(args: argparse.Namespace) -> int:
    if args.machines < 1:
        print("appliance demo: --machines must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp:
        summary = asyncio.run(_demo(args, Path(tmp)))
    line = (
        f"demo summary: {summary['telemetry_messages']} telemetry messages, "
        f"{summary['alerts_raised']} alerts raised, {summary['alerts_cleared']} cleared, "
        f"{summary['polls']} polls, {summary['published']} messages published, "
        f"{summary['subscriber']['gaps']} sequence gaps, "
        f"{summary['bandwidth']['published_bytes']} bytes published vs "
        f"{summary['bandwidth']['raw_json_bytes']} as one JSON message per raw sample"
    )
    print(line, flush=True)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0
