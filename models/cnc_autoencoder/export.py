"""Train and export the CNC autoencoder: reconstruction error over the cnc_condition features.

    python -m models.cnc_autoencoder.export [--out DIR] [--seed N] [--minutes M]

Needs the ``train`` extra (PyTorch, CPU). Same windows, features and condition as
``models/cnc_condition`` (``FEATURES``, ``CONDITION``: spindle turning steadily), same training
and calibration machines; model: ``appliance.modelkit.autoencoder`` (12 → 32 → 4 → 32 → 12,
ReLU), score = mean squared reconstruction error of the standardised features over its
reference, with the threshold rule of cnc_condition (the training windows' 99.99th percentile
or 1.1 × the highest score of 32 held-out machines, whichever is larger). Deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from appliance.modelkit.autoencoder import AutoencoderModel, fit_autoencoder
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.simulate.dataset import FaultEvent
from models.cnc_condition.export import (
    CALIB_MACHINES,
    CALIB_MINUTES,
    CONDITION,
    FEATURES,
    MARGIN,
    QUANTILE,
    WINDOW_S,
    windows,
)

NAME = "cnc_autoencoder"
VERSION = "2.0.0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--machines", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=8.0, help="normal data per machine")
    args = ap.parse_args()

    train = np.vstack(
        [windows(args.seed, i, args.minutes * 60)[1] for i in range(args.machines)]
    ).astype(np.float64)
    model = fit_autoencoder(train, QUANTILE, hidden=32, bottleneck=4, epochs=80, seed=args.seed)
    calib = np.vstack(
        [windows(args.seed + 500, i, CALIB_MINUTES * 60)[1] for i in range(CALIB_MACHINES)]
    ).astype(np.float64)
    raw = model.score(calib) * model.s_ref
    s_ref = max(model.s_ref, MARGIN * float(raw.max()))
    model = AutoencoderModel(model.mean, model.std, model.weights, model.biases, s_ref)
    onnx_bytes = finish_model(model.onnx_graph(NAME))
    _, hold = windows(args.seed + 1, 0, 300)
    t_bad, bad = windows(args.seed + 2, 1, 300, (FaultEvent(100, "chatter", 150),))
    in_fault = bad[(t_bad > 150.0) & (t_bad <= 250.0)]
    golden_in = np.vstack([hold[:8], in_fault[:8]]).astype(np.float32)
    golden_out = model.score(golden_in.astype(np.float64)).astype(np.float32)
    write_bundle(
        args.out,
        name=NAME,
        version=VERSION,
        description="autoencoder reconstruction error over sample features; 1.0 = threshold",
        onnx_bytes=onnx_bytes,
        features=FEATURES,
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        golden_rtol=1e-3,
        golden_atol=1e-4,
        extra={
            "kind": "autoencoder",
            "condition": condition_manifest(CONDITION),
            "training": {
                "seed": args.seed,
                "machines": args.machines,
                "windows": int(len(train)),
                "calibration_windows": int(len(calib)),
                "quantile": QUANTILE,
            },
        },
    )
    print(f"trained on {len(train)} windows; wrote {args.out}")


if __name__ == "__main__":
    main()
