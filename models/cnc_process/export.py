"""Train and export the CNC process-drift model: a bank of conditional Gaussian scores over the
scalar channels only (deterministic; no vibration waveform needed).

    python -m models.cnc_process.export [--out DIR] [--seed N] [--machines K] [--minutes M]

Features (``FEATURES``): the operating point (spindle speed and load means, ``GIVEN``) and the
slow process quantities at it: spindle and coolant temperature means and trends (least-squares
slope over the window) and the vibration RMS register's mean. Model
(``appliance.modelkit.gaussian.fit_gaussian_bank``): one conditional Gaussian per ``PARTS``
entry (vibration; coolant temperature and trend; spindle temperature and trend), each the
Mahalanobis distance of its quantities' residuals from their regression on speed and load, each
with its own threshold; the score is the largest of the three, so a dulling tool (vibration),
a coolant loss or an overheating spindle is not averaged away by the quantities it leaves
alone. Training data, condition and threshold rule (per part) are those of
``models/cnc_condition``: 1.0 = the larger of the training windows' 99.99th percentile and 1.1 ×
the highest score of 32 held-out machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.modelkit.gaussian import GaussianBank, fit_gaussian_bank
from appliance.simulate.dataset import EPOCH_S, FaultEvent, simulate_frames
from models.cnc_condition.export import (
    CALIB_MACHINES,
    CALIB_MINUTES,
    CONDITION,
    MARGIN,
    QUANTILE,
    WINDOW_S,
)

NAME = "cnc_process"
VERSION = "1.0.0"
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("spindle_speed", "mean"),
    FeatureSpec("spindle_load", "mean"),
    FeatureSpec("spindle_temp", "mean"),
    FeatureSpec("spindle_temp", "slope"),
    FeatureSpec("coolant_temp", "mean"),
    FeatureSpec("coolant_temp", "slope"),
    FeatureSpec("vibration_rms", "mean"),
)
#: Columns of ``FEATURES`` the score is conditioned on (spindle speed and load means).
GIVEN = (0, 1)
#: The bank's parts: the columns each scores given ``GIVEN`` (vibration, coolant, spindle).
PARTS: tuple[tuple[int, ...], ...] = ((6,), (4, 5), (2, 3))


def windows(
    seed: int, index: int, seconds: float, faults: tuple[FaultEvent, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(t_rel [W] seconds since start at window end, X [W, F]) of one simulated machine."""
    ends, x, _ = features_from_frames(
        simulate_frames(seed, index, seconds, faults, waveform=False),
        FEATURES,
        WINDOW_S,
        condition=CONDITION,
    )
    return ends - EPOCH_S, x


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
    model = fit_gaussian_bank(train, [(GIVEN, part) for part in PARTS], QUANTILE)
    calib = np.vstack(
        [windows(args.seed + 500, i, CALIB_MINUTES * 60)[1] for i in range(CALIB_MACHINES)]
    ).astype(np.float64)
    d_calib = model.part_scores(calib) * model.s_ref
    s_ref = np.maximum(model.s_ref, MARGIN * d_calib.max(axis=0))
    model = GaussianBank(model.mean, model.whiten, model.pool, s_ref)
    onnx_bytes = finish_model(model.onnx_graph(NAME))
    _, hold = windows(args.seed + 1, 0, 300)
    t_bad, bad = windows(args.seed + 2, 1, 300, (FaultEvent(100, "coolant_loss", 150),))
    in_fault = bad[(t_bad > 200.0) & (t_bad <= 250.0)]
    golden_in = np.vstack([hold[:8], in_fault[:8]]).astype(np.float32)
    golden_out = model.score(golden_in.astype(np.float64)).astype(np.float32)
    write_bundle(
        args.out,
        name=NAME,
        version=VERSION,
        description=(
            "largest of three conditional Mahalanobis scores given spindle speed and load "
            "(vibration RMS; coolant temperature and trend; spindle temperature and trend); "
            "1.0 = alert threshold"
        ),
        onnx_bytes=onnx_bytes,
        features=FEATURES,
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        extra={
            "kind": "gaussian_bank",
            "given": [FEATURES[j].channel + ":" + FEATURES[j].stat for j in GIVEN],
            "parts": [[FEATURES[j].channel + ":" + FEATURES[j].stat for j in p] for p in PARTS],
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
