"""The onboarding path measured end to end: `appliance record` of the simulator → `appliance
model fit` → `appliance model eval`, with the appliance's own code at every step.

    python -m models.onboarding [--out DIR] [--time-scale X] [--normal-s S] [--faulty-s S]
                                [--context COLUMN]

1. A healthy cell (7 machines, seed 11) is recorded for ``--normal-s`` + ``--faulty-s`` wall
   seconds over Modbus TCP (``appliance.modelkit.record.record``, what ``appliance record``
   runs); each machine's file is split in time: the first ``--normal-s`` seconds to fit on, the
   rest as unseen healthy data of the same machines.
2. ``fit_model`` (``appliance model fit``: Gaussian, the 8 continuous channels, threshold at
   the 99.99th percentile of the normal windows) fits on the first parts.
3. The same cell with fault kind *i* on machine *i* from its start for the whole recording is
   recorded for ``--faulty-s`` wall seconds.
4. ``evaluate`` (``appliance model eval``) scores them: per fault kind, the AUC of that machine's
   faulty recording against the healthy held-out parts; false alarms per shift on those.
5. With ``--context COLUMN`` (e.g. ``program_state``, the machining phase), steps 2 and 4 are
   repeated with ``model fit --context COLUMN`` on the same recordings, for a second table.

``--time-scale`` fast-forwards the simulator: windows are wall-clock seconds, so one window holds
``time_scale`` simulated seconds in training and in evaluation alike. No vibration waveform (its
FIFO overruns when fast-forwarded), so the waveform faults are seen through the 10 Hz channels only.
Prints a Markdown table and writes ``report.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from pathlib import Path
from typing import Any

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.modelkit.evaluate import evaluate
from appliance.modelkit.fit import fit_model
from appliance.modelkit.metrics import roc_auc
from appliance.modelkit.record import record
from appliance.simulate.cell import FaultSchedule, SimulatedCell
from appliance.simulate.machine import FAULT_KINDS
from models.simulated import CONTINUOUS

CHANNELS = list(CONTINUOUS)


async def _record_cell(
    out: Path, seed: int, machines: int, seconds: float, scale: float, faults: list[FaultSchedule]
) -> list[Path]:
    ports = [free_port() for _ in range(machines)]
    cell = SimulatedCell(
        machines=machines, ports=ports, seed=seed, time_scale=scale, faults=faults,
        fifo_address=None,
    )  # fmt: skip
    cfg = parse_config(
        {
            "devices": [
                {"name": f"cnc-{i + 1}", "port": p, "profile": "cnc-sim", "poll_interval_ms": 100}
                for i, p in enumerate(ports)
            ]
        },
        base_dir=out,
    )
    await cell.start()
    try:
        await record(cfg, out, seconds)
    finally:
        await cell.stop()
    return [out / f"cnc-{i + 1}.csv" for i in range(machines)]


def _split(path: Path, first_s: float, rest_dir: Path) -> tuple[Path, Path]:
    """Split a recording at ``first_s`` seconds after its first row: (first part, the rest)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    t0 = float(rows[1][0])
    head = [r for r in rows[1:] if float(r[0]) < t0 + first_s]
    tail = [r for r in rows[1:] if float(r[0]) >= t0 + first_s]
    out = (path.with_name(f"{path.stem}.fit.csv"), rest_dir / path.name)
    for target, part in zip(out, (head, tail), strict=True):
        with target.open("w", newline="") as f:
            csv.writer(f).writerows([rows[0], *part])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/onboarding"))
    ap.add_argument("--time-scale", type=float, default=5.0)
    ap.add_argument("--normal-s", type=float, default=300.0, help="wall seconds of training data")
    ap.add_argument("--faulty-s", type=float, default=90.0, help="wall seconds per eval recording")
    ap.add_argument("--context", help="also fit and score a model conditioned on this column")
    args = ap.parse_args()
    kinds = list(FAULT_KINDS)
    n = len(kinds)
    train_dir, healthy_dir, faulty_dir = (args.out / d for d in ("train", "healthy", "faulty"))
    for d in (train_dir, healthy_dir, faulty_dir):
        d.mkdir(parents=True, exist_ok=True)
    total = args.normal_s + args.faulty_s
    whole = asyncio.run(_record_cell(train_dir, 11, n, total, args.time_scale, []))
    train, healthy = [], []
    for path in whole:
        a, b = _split(path, args.normal_s, healthy_dir)
        train.append(a)
        healthy.append(b)
    bundle = args.out / "bundle"
    fit_model(train, bundle, channels=CHANNELS, name="onboarded", quantile=0.9999)
    # each fault lasts the whole recording: ramps (temp_ramp, tool_wear, coolant_loss) reach
    # their full size at its end
    sim_s = args.faulty_s * args.time_scale
    faults = [FaultSchedule(i, k, 0.0, sim_s) for i, k in enumerate(kinds)]
    faulty = asyncio.run(_record_cell(faulty_dir, 11, n, args.faulty_s, args.time_scale, faults))
    report = evaluate(str(bundle), healthy, faulty)
    out: dict[str, Any] = {"rows": _table(report, kinds), **report}
    if args.context:
        ctx_bundle = args.out / "bundle_context"
        fit_model(train, ctx_bundle, channels=CHANNELS, name="onboarded_context",
                  quantile=0.9999, context=args.context)  # fmt: skip
        ctx_report = evaluate(str(ctx_bundle), healthy, faulty)
        print(f"\nwith --context {args.context}:")
        out["context"] = {"rows": _table(ctx_report, kinds), **ctx_report}
    (args.out / "report.json").write_text(json.dumps(out, indent=1))


def _table(report: dict[str, Any], kinds: list[str]) -> list[dict[str, Any]]:
    """Print the per-fault Markdown table and the overall line of ``report``; its rows."""
    neg = [s for f in report["files"] if f["label"] == "normal" for s in f["score"]]
    rows: list[dict[str, Any]] = []
    print("| fault | AUC | windows above threshold | detection delay s |")
    print("|---|---:|---:|---:|")
    for kind, f in zip(kinds, [f for f in report["files"] if f["label"] == "faulty"], strict=True):
        auc = roc_auc(neg, f["score"])
        d = f["detection_delay_s"]
        rows.append({"fault": kind, "auc": auc, "above": f["above_threshold"], "delay_s": d})
        delay = "–" if d is None else f"{d:.1f}"
        print(f"| `{kind}` | {auc:.3f} | {f['above_threshold']:.1%} | {delay} |")
    scored = sum(f["windows"] for f in report["files"] if f["label"] == "normal")
    print(
        f"\noverall AUC {report['auc']:.3f}; false alarms per 8-hour shift on healthy recordings: "
        f"{report['false_alarms_per_shift']:.2f} ({scored} healthy windows scored)"
    )
    return rows


if __name__ == "__main__":
    main()
