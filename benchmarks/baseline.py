"""The naive baseline: the appliance's job done the way the usual tutorials do it.

One loop polls each machine in turn with a synchronous pymodbus client, scores each sample on
its own (one onnxruntime call per sample, the sample's value standing for both the window mean
and max the model expects), checks the same thresholds per sample, and publishes each sample as
its own JSON message with paho (QoS 0, as the tutorials do; no disk buffer: whatever cannot be
sent is gone). Every message carries a per-machine ``seq`` so the harness can count what was
lost; nothing else here is tuned.

Run as its own process by the harness (``python -m benchmarks.baseline ...``) so that its CPU
and memory are measured from /proc exactly like the appliance's. On SIGTERM (or after
``--duration``) it writes its counters to ``--stats-json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.client import ModbusTcpClient

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "drivers" / "profiles"
MODEL_DIR = ROOT / "models" / "cnc_anomaly"
#: The same rules as the appliance's bench config (benchmarks/bench.py CONFIG_TEMPLATE).
THRESHOLDS = {"spindle_temp": 75.0, "vibration_rms": 9.0}
SCORE_ABOVE = 2.0

_WIDTH = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
_FMT = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}


def load_registers(profile: str) -> list[dict[str, Any]]:
    with open(PROFILES / f"{profile}.toml", "rb") as f:
        regs: list[dict[str, Any]] = tomllib.load(f)["registers"]
    return regs


def decode(regs: list[dict[str, Any]], table: str, words: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in regs:
        if r.get("table", "holding") != table:
            continue
        a, w = r["address"], _WIDTH[r.get("type", "uint16")]
        raw = struct.pack(f">{w}H", *words[a : a + w])
        out[r["name"]] = struct.unpack(_FMT[r.get("type", "uint16")], raw)[0] * r.get("scale", 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__)
    p.add_argument("--ports", required=True, help="comma-separated Modbus TCP ports, one a machine")
    p.add_argument("--mqtt-port", type=int, required=True)
    p.add_argument("--rate-hz", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--stats-json", type=Path, default=None)
    p.add_argument("--prefix", default="naive")
    p.add_argument("--profile", default="cnc-sim", help="register map (drivers/profiles/NAME.toml)")
    args = p.parse_args(argv)

    regs = load_registers(args.profile)
    span = {
        t: max((r["address"] + _WIDTH[r["type"]] for r in regs if r.get("table") == t), default=0)
        for t in ("input", "holding")
    }
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL_DIR / manifest["onnx"]), so, ["CPUExecutionProvider"])
    features = [f["channel"] for f in manifest["features"]]

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-baseline")
    client.connect_async("127.0.0.1", args.mqtt_port)
    client.loop_start()
    machines = [
        (f"cnc-{i + 1}", ModbusTcpClient("127.0.0.1", port=int(port), timeout=0.5))
        for i, port in enumerate(args.ports.split(","))
    ]
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    stats = {"polls": 0, "errors": 0, "values": 0, "published": 0, "publish_failed": 0}
    seq = dict.fromkeys((name for name, _ in machines), 0)
    alert_seq = dict.fromkeys((name for name, _ in machines), 0)
    active: set[tuple[str, str]] = set()
    period = 1.0 / args.rate_hz
    next_t = time.monotonic()
    health_at, health_polls = next_t + 1.0, 0
    end = None if args.duration is None else next_t + args.duration
    while not stop and (end is None or time.monotonic() < end):
        for name, c in machines:
            try:
                if not c.connected:
                    c.connect()  # type: ignore[no-untyped-call]
                sample: dict[str, float] = {}
                for table, n in span.items():
                    if not n:
                        continue
                    read = c.read_input_registers if table == "input" else c.read_holding_registers
                    rr = read(0, count=n, device_id=1)
                    if rr.isError():
                        raise OSError("exception response")
                    sample |= decode(regs, table, rr.registers)
            except Exception:  # the tutorials' catch-all
                stats["errors"] += 1
                continue
            ts = time.time()
            stats["polls"] += 1
            stats["values"] += len(sample)
            score = float("nan")  # a register map without the model's channels is not scored
            if all(ch in sample for ch in features):
                x = np.array([[sample[ch] for ch in features]], dtype=np.float32)
                score = float(session.run(None, {manifest["input"]: x})[0].reshape(-1)[0])
            seq[name] += 1
            msg = {"machine": name, "ts": ts, "seq": seq[name], "score": score, **sample}
            info = client.publish(f"{args.prefix}/{name}/data", json.dumps(msg))
            stats["published" if info.rc == mqtt.MQTT_ERR_SUCCESS else "publish_failed"] += 1
            checks = [(ch, sample[ch], lim) for ch, lim in THRESHOLDS.items() if ch in sample]
            checks.append(("score", score, SCORE_ABOVE))
            for rule, value, limit in checks:
                key = (name, rule)
                if value > limit and key not in active:
                    active.add(key)
                    alert_seq[name] += 1
                    alert = {"machine": name, "ts": ts, "seq": alert_seq[name], "rule": rule}
                    alert |= {"state": "raised", "value": value}
                    client.publish(f"{args.prefix}/{name}/alert", json.dumps(alert))
                elif value <= limit * 0.8 and key in active:
                    active.discard(key)
        if time.monotonic() >= health_at:  # the appliance's health line, for the harness
            print(
                f"health: {stats['polls'] - health_polls} polls, outbox pending 0",
                file=sys.stderr,
                flush=True,
            )
            health_at, health_polls = health_at + 1.0, stats["polls"]
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()
    time.sleep(0.2)
    client.loop_stop()
    client.disconnect()
    for _, c in machines:
        c.close()  # type: ignore[no-untyped-call]
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
