#!/usr/bin/env python3
"""Bandwidth benchmark: bytes published per telemetry configuration against one JSON message
per raw sample, and the per-frame CPU cost of the stages that judge every frame.

Offline and deterministic (no sockets, no wall clock): ``--machines`` simulated CNC machines
(``appliance.simulate.machine.CncMachine``, the ``cnc-sim`` channels) sampled at ``--rate-hz``
for ``--seconds`` simulated seconds, one spindle over-temperature fault (``temp_ramp``) on the
first machine at a third of the run. The frames go through the appliance's own stages: the
window aggregator (1 s windows) → ``TelemetryDownsampler`` (each configuration below), the
``AlertEngine`` with an over-temperature rule and a device-offline rule, and the
``BandwidthMeter``; every envelope is encoded with the outbox's ``PayloadEncoder``, so the
published bytes are the payloads the outbox would store and the uplink publish.

Configurations: ``window`` (one message per 1 s window), ``10s`` and ``60s`` aggregates (n,
mean, min, max, last, std), and ``10s+deadband`` (the two temperatures reported by exception
within 0.5 °C, at least every 300 s). Reported per configuration: telemetry bytes, alert bytes,
raw JSON bytes, reduction (a fraction). Per-frame CPU (µs, ``time.process_time``) of
``AlertEngine.on_frame``, ``DataQualityMonitor.on_frame`` and ``BandwidthMeter.on_frame``, the
three per-frame additions of the alert and bandwidth work, next to ``WindowAggregator.on_frame``.

Run ``python benchmarks/bandwidth.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.alerts import AlertEngine  # noqa: E402
from appliance.alerts.quality import DataQualityMonitor  # noqa: E402
from appliance.config import ThresholdRule  # noqa: E402
from appliance.contracts import Envelope, Frame, OutboxRecord  # noqa: E402
from appliance.downsample import BandwidthMeter, TelemetryDownsampler  # noqa: E402
from appliance.features import WindowAggregator  # noqa: E402
from appliance.payload import PayloadEncoder  # noqa: E402
from appliance.simulate.machine import CHANNELS, CncMachine  # noqa: E402

STATS = ("mean", "min", "max", "last", "std")
CONFIGS: dict[str, dict[str, Any]] = {
    "window": {"interval_s": 0.0},
    "10s": {"interval_s": 10.0},
    "60s": {"interval_s": 60.0},
    "10s+deadband": {
        "interval_s": 10.0,
        "deadband": {"spindle_temp": 0.5, "coolant_temp": 0.5},
    },
}
RULES = [
    ThresholdRule(name="spindle_overtemp", channel="spindle_temp", above=75.0, clear_below=65.0),
    ThresholdRule(name="device_offline", kind="offline"),
]


def make_frames(machines: int, seconds: float, rate_hz: float, seed: int) -> list[Frame]:
    """Frames of every machine, in time order (one per poll, every channel)."""
    sims = [CncMachine(seed, i) for i in range(machines)]
    dt = 1.0 / rate_hz
    t0 = 1_795_000_000.0
    idx = np.arange(len(CHANNELS), dtype=np.int32)
    quality = np.zeros(len(CHANNELS), np.uint8)
    frames: list[Frame] = []
    steps = int(seconds * rate_hz)
    for k in range(steps):
        if k == steps // 3:
            sims[0].inject("temp_ramp", 15.0)
        ts = t0 + k * dt
        for i, sim in enumerate(sims):
            sim.step(dt)
            values = sim.values()
            frames.append(
                Frame(
                    f"cnc-{i + 1}",
                    CHANNELS,
                    np.full(len(CHANNELS), ts),
                    idx,
                    np.array([values[c] for c in CHANNELS]),
                    quality,
                )
            )
    return frames


class Published:
    """Encodes envelopes as the outbox does and hands the records to a ``BandwidthMeter``."""

    def __init__(self, meter: BandwidthMeter) -> None:
        self.encoder = PayloadEncoder("bench")
        self.meter = meter
        self.seq: dict[str, int] = {}
        self.by_kind: dict[str, int] = {}

    def __call__(self, envelopes: Sequence[Envelope]) -> None:
        records = []
        for env in envelopes:
            seq = self.seq[env.stream] = self.seq.get(env.stream, 0) + 1
            payload = self.encoder.encode(env, seq)
            self.by_kind[env.kind] = self.by_kind.get(env.kind, 0) + len(payload)
            records.append(
                OutboxRecord(0, env.stream, seq, env.topic, int(env.priority), payload, 0.0)
            )
        self.meter.on_records(records)


def run_config(frames: list[Frame], name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    meter = BandwidthMeter("bench")
    out = Published(meter)
    downsampler = TelemetryDownsampler(
        STATS,
        out,
        lambda m: f"edge/bench/telemetry/{m}",
        interval_s=cfg["interval_s"],
        deadband=cfg.get("deadband"),
    )
    windows = WindowAggregator(1.0, [downsampler])
    alerts = AlertEngine(
        RULES,
        out,
        lambda m: f"edge/bench/alerts/{m}",
        devices=sorted({f.device for f in frames}),
        clock=lambda: frames[0].ts[0],
    )
    alerts.start()
    next_tick = float(frames[0].ts[0]) + 1.0
    for f in frames:
        meter.on_frame(f)
        windows.on_frame(f)
        alerts.on_frame(f)
        if f.ts[0] >= next_tick:
            alerts.tick(float(f.ts[0]))
            next_tick += 1.0
    windows.flush()
    downsampler.flush()
    s = meter.stats()
    return {
        "config": name,
        **{k: v for k, v in cfg.items() if k != "deadband"},
        "deadband": cfg.get("deadband", {}),
        "telemetry_messages": downsampler.messages,
        "telemetry_bytes": out.by_kind.get("telemetry", 0),
        "alert_bytes": out.by_kind.get("alert", 0),
        "alerts_raised": alerts.raised,
        "alerts_cleared": alerts.cleared,
        "published_bytes": s["published_bytes"],
        "raw_json_bytes": s["raw_json_bytes"],
        "reduction": s["reduction"],
    }


def per_frame_us(frames: list[Frame], sink: Callable[[Frame], None]) -> float:
    start = time.process_time()
    for f in frames:
        sink(f)
    return (time.process_time() - start) / len(frames) * 1e6


def costs(frames: list[Frame]) -> dict[str, float]:
    alerts = AlertEngine(RULES, lambda e: None, lambda m: m, clock=lambda: frames[0].ts[0])
    alerts.start()
    quality = DataQualityMonitor(lambda e: None, lambda m: m, clock=lambda: frames[0].ts[0])
    meter = BandwidthMeter("bench")
    windows = WindowAggregator(1.0, [lambda w: None])
    return {
        "windows_us_per_frame": per_frame_us(frames, windows.on_frame),
        "alerts_us_per_frame": per_frame_us(frames, alerts.on_frame),
        "quality_us_per_frame": per_frame_us(frames, quality.on_frame),
        "bandwidth_us_per_frame": per_frame_us(frames, meter.on_frame),
    }


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'config':<14} {'telemetry B':>12} {'alerts B':>9} {'raw JSON B':>12} {'reduction':>10}"
    ]
    for r in summary["configs"]:
        lines.append(
            f"{r['config']:<14} {r['telemetry_bytes']:>12} {r['alert_bytes']:>9} "
            f"{r['raw_json_bytes']:>12} {r['reduction']:>10.4f}"
        )
    c = summary["cpu"]
    lines.append(
        "per frame (µs): windows {windows_us_per_frame:.1f}, alerts {alerts_us_per_frame:.1f}, "
        "quality {quality_us_per_frame:.1f}, bandwidth {bandwidth_us_per_frame:.1f}".format(**c)
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", type=int, default=4, help="simulated machines (default 4)")
    p.add_argument("--seconds", type=float, default=600.0, help="simulated seconds (600)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="polls per second (10)")
    p.add_argument("--seed", type=int, default=42, help="simulator seed (42)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON summary")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    frames = make_frames(args.machines, args.seconds, args.rate_hz, args.seed)
    summary = {
        "machines": args.machines,
        "seconds": args.seconds,
        "rate_hz": args.rate_hz,
        "frames": len(frames),
        "samples": sum(len(f.value) for f in frames),
        "configs": [run_config(frames, name, cfg) for name, cfg in CONFIGS.items()],
        "cpu": costs(frames),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
    }
    print(table(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
