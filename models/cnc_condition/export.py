"""Train and export the CNC condition model: a Gaussian score over sample features (deterministic).

    python -m models.cnc_condition.export [--out DIR] [--seed N] [--minutes M]

Features (``FEATURES``): per continuous channel mean, std, max and slope; for the vibration
waveform RMS, kurtosis, crest factor, FFT band energies (dB), dominant frequency and spectral
centroid, all computed by ``appliance.features.extract.window_features`` from windows built by
``appliance.features.samples.SampleFeatureBuilder`` over frames of
``appliance.simulate.dataset.simulate_frames`` (what serving computes). Model: the Mahalanobis
score of ``appliance.modelkit.gaussian``; 1.0 is the 99.99th percentile of normal windows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.export import finish_model, write_bundle
from appliance.modelkit.gaussian import fit_gaussian
from appliance.simulate.dataset import WAVE_CHANNEL, FaultEvent, simulate_frames

NAME = "cnc_condition"
VERSION = "1.0.0"
WINDOW_S = 1.0
QUANTILE = 0.9999
CONTINUOUS = (
    "spindle_speed",
    "spindle_load",
    "axis_load_x",
    "axis_load_y",
    "axis_load_z",
    "spindle_temp",
    "coolant_temp",
    "vibration_rms",
)
BANDS_HZ = ((0, 30), (30, 60), (60, 100), (100, 150), (150, 200), (200, 300), (300, 360))
BANDS_HZ += ((360, 440), (440, 500))
FEATURES: tuple[FeatureSpec, ...] = (
    *(FeatureSpec(c, s) for c in CONTINUOUS for s in ("mean", "std", "max", "slope")),
    *(FeatureSpec(WAVE_CHANNEL, s) for s in ("rms", "kurtosis", "crest", "dom_freq", "centroid")),
    *(FeatureSpec(WAVE_CHANNEL, f"band:{lo}-{hi}") for lo, hi in BANDS_HZ),
)


def windows(
    seed: int, index: int, seconds: float, faults: tuple[FaultEvent, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(t_rel [W] seconds since start at window end, X [W, F]) of one simulated machine."""
    from appliance.simulate.dataset import EPOCH_S

    ends, x, _ = features_from_frames(simulate_frames(seed, index, seconds, faults), FEATURES, 1.0)
    return ends - EPOCH_S, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--machines", type=int, default=6)
    ap.add_argument("--minutes", type=float, default=40.0, help="normal data per machine")
    args = ap.parse_args()

    train = np.vstack(
        [windows(args.seed, i, args.minutes * 60)[1] for i in range(args.machines)]
    ).astype(np.float64)
    model = fit_gaussian(train, QUANTILE)
    onnx_bytes = finish_model(model.onnx_graph(NAME))
    _, hold = windows(args.seed + 1, 0, 300)
    _, bad = windows(args.seed + 2, 1, 300, (FaultEvent(100, "bearing_defect", 150),))
    golden_in = np.vstack([hold[:8], bad[150:158]]).astype(np.float32)
    golden_out = model.score(golden_in.astype(np.float64)).astype(np.float32)
    write_bundle(
        args.out,
        name=NAME,
        version=VERSION,
        description="Mahalanobis score over sample features; 1.0 = p99.99 of normal windows",
        onnx_bytes=onnx_bytes,
        features=FEATURES,
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        extra={
            "kind": "gaussian",
            "training": {
                "seed": args.seed,
                "machines": args.machines,
                "windows": int(len(train)),
                "quantile": QUANTILE,
            },
        },
    )
    print(f"trained on {len(train)} windows; wrote {args.out}")


if __name__ == "__main__":
    main()
