"""Train and export the CNC window anomaly model (deterministic).

    python -m models.cnc_anomaly.export [--out DIR] [--seed N]

Model: x (16 window features) → y = (x - mean) @ W with W W^T = (Σ + λI)^-1 (whitening),
score = sqrt(mean(y²)) / s_ref, where s_ref is the 99.9th percentile of that distance over the
normal training windows. A score above 1.0 is rarer than 1 in 1000 normal windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from appliance.contracts import Frame, Window
from appliance.features.windows import FeatureSpec, WindowAggregator
from appliance.modelkit.export import IR_VERSION, OPSET, finish_model
from appliance.modelkit.gaussian import GaussianModel
from appliance.simulate.machine import CncMachine
from models.simulated import CONTINUOUS

NAME = "cnc_anomaly"
VERSION = "1.0.0"
WINDOW_S = 1.0
POLL_S = 0.1
#: Continuous channels only: the part counter and program state are not features.
CHANNELS = CONTINUOUS
FEATURES = tuple(FeatureSpec(c, s) for c in CHANNELS for s in ("mean", "max"))


def simulate_windows(
    seed: int, index: int, seconds: float, faults: tuple[tuple[float, str, float], ...] = ()
) -> np.ndarray:
    """Feature vectors of consecutive windows of one simulated machine polled every POLL_S."""
    machine = CncMachine(seed=seed, index=index)
    windows: list[Window] = []
    agg = WindowAggregator(WINDOW_S, [windows.append])
    channels = tuple(CHANNELS)
    ch_idx = np.arange(len(channels), dtype=np.int32)
    quality = np.zeros(len(channels), np.uint8)
    pending = sorted(faults)
    t = 0.0
    for _ in range(int(seconds / POLL_S)):
        machine.step(POLL_S)
        t += POLL_S
        while pending and pending[0][0] <= t:
            _, kind, duration = pending.pop(0)
            machine.inject(kind, duration)
        vals = machine.values()
        agg.on_frame(
            Frame(
                device="m",
                channels=channels,
                ts=np.full(len(channels), 1e9 + t),
                channel=ch_idx,
                value=np.array([vals[c] for c in channels], dtype=np.float64),
                quality=quality,
            )
        )
    agg.flush()
    rows = []
    for w in windows[1:-1]:  # drop the partial first and last windows
        pos = {c: i for i, c in enumerate(w.channels)}
        rows.append([getattr(w, f.stat)[pos[f.channel]] for f in FEATURES])
    return np.asarray(rows, dtype=np.float64)


def fit(x: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, float]:
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-9
    cov = np.cov((x - mean) / std, rowvar=False)
    cov += ridge * np.eye(cov.shape[0])
    inv = np.linalg.inv(cov)
    chol = np.linalg.cholesky(inv)  # inv = L L^T, so |(z) @ L|² = z^T inv z
    w = chol / std[:, None]  # fold the standardisation into W
    d = np.sqrt(np.mean(((x - mean) @ w) ** 2, axis=1))
    s_ref = float(np.quantile(d, 0.999))
    return mean, w, s_ref


def reference_score(x: np.ndarray, mean: np.ndarray, w: np.ndarray, s_ref: float) -> np.ndarray:
    """NumPy reference of the ONNX graph (float64)."""
    return GaussianModel(mean, w, s_ref).score(x)


def build_onnx(mean: np.ndarray, w: np.ndarray, s_ref: float) -> bytes:
    """The graph of :class:`appliance.modelkit.gaussian.GaussianModel`, checked (ONNX checker,
    TensorRT operators) and serialised at ``OPSET``/``IR_VERSION``."""
    return finish_model(GaussianModel(mean, w, s_ref).onnx_graph(NAME), producer="appliance-export")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--minutes", type=float, default=30.0, help="normal data per machine")
    args = ap.parse_args()

    train = np.vstack([simulate_windows(args.seed, i, args.minutes * 60) for i in range(4)])
    mean, w, s_ref = fit(train)
    holdout = simulate_windows(args.seed + 1, 7, 600)
    faulty_temp = simulate_windows(args.seed + 2, 1, 120, ((30.0, "temp_ramp", 30.0),))
    faulty_vib = simulate_windows(args.seed + 3, 2, 120, ((30.0, "vibration_surge", 20.0),))

    hs = reference_score(holdout, mean, w, s_ref)
    ts = reference_score(faulty_temp, mean, w, s_ref)
    vs = reference_score(faulty_vib, mean, w, s_ref)
    print(
        f"train windows {len(train)}; holdout score p50 {np.median(hs):.3f} "
        f"p99 {np.quantile(hs, 0.99):.3f} max {hs.max():.3f} "
        f">1.0: {np.mean(hs > 1.0) * 100:.2f}%  >1.5: {np.mean(hs > 1.5) * 100:.2f}%"
    )
    print(f"temp_ramp max score {ts.max():.2f}; vibration_surge max score {vs.max():.2f}")

    onnx_bytes = build_onnx(mean, w, s_ref)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.onnx").write_bytes(onnx_bytes)

    golden_in = np.vstack([holdout[:8], faulty_temp[40:46], faulty_vib[35:41]]).astype(np.float32)
    golden_out = reference_score(golden_in.astype(np.float64), mean, w, s_ref).astype(np.float32)
    np.savez(args.out / "golden.npz", inputs=golden_in, outputs=golden_out)

    manifest = {
        "name": NAME,
        "version": VERSION,
        "description": "Mahalanobis anomaly score of one machine window; 1.0 = p99.9 of normal",
        "onnx": "model.onnx",
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "input": "features",
        "output": "score",
        "window_s": WINDOW_S,
        "features": [{"channel": f.channel, "stat": f.stat} for f in FEATURES],
        "golden": "golden.npz",
        "golden_atol": 1e-4,
        "training": {
            "seed": args.seed,
            "windows": int(len(train)),
            "holdout_p99": float(np.quantile(hs, 0.99)),
            "holdout_false_rate_above_1_5": float(np.mean(hs > 1.5)),
            "temp_ramp_max_score": float(ts.max()),
            "vibration_surge_max_score": float(vs.max()),
        },
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out}/model.onnx, manifest.json, golden.npz")


if __name__ == "__main__":
    main()
