"""Train and export the CNC condition model: a conditional Gaussian score over sample features
(deterministic).

    python -m models.cnc_condition.export [--out DIR] [--seed N] [--machines K] [--minutes M]

Features (``FEATURES``): the operating point (spindle speed and load means, ``GIVEN``) and what
the machine shows at it: spindle and coolant temperature means, the coolant's trend, vibration
RMS (register and waveform), and the waveform's kurtosis, 1× rotation share, non-harmonic share,
chatter band energy and bearing ball-pass order share (``order_frac:3.58``), all computed by
``appliance.features.extract.window_features`` from windows built by
``appliance.features.samples.SampleFeatureBuilder`` over frames of
``appliance.simulate.dataset.simulate_frames`` (what serving computes). Model: the conditional
Mahalanobis score of ``appliance.modelkit.gaussian.fit_conditional_gaussian``: the other
features' residuals from their linear regression on ``GIVEN``, so an unusual speed or load is
not an anomaly, an unusual vibration or temperature *at* that speed and load is. 1.0 is the
threshold: the 99.99th percentile of the normal training windows or 1.1 × the highest score of
32 held-out machines, whichever is larger. Windows outside ``CONDITION`` (spindle stopped or
changing speed) are not scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.modelkit.gaussian import GaussianModel, fit_conditional_gaussian
from appliance.simulate.dataset import WAVE_CHANNEL, FaultEvent, simulate_frames
from appliance.simulate.machine import BEARING_BPFO_ORDER

NAME = "cnc_condition"
VERSION = "2.0.0"
WINDOW_S = 1.0
QUANTILE = 0.9999
CALIB_MACHINES, CALIB_MINUTES, MARGIN = 32, 10.0, 1.1
#: Features: the operating point (the first ``len(GIVEN)``), then the process channels' window
#: means and trend and the waveform's shape, spectrum and rotation-order shares
#: (``appliance.features.extract``).
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("spindle_speed", "mean"),
    FeatureSpec("spindle_load", "mean"),
    FeatureSpec("spindle_temp", "mean"),
    FeatureSpec("coolant_temp", "mean"),
    FeatureSpec("coolant_temp", "slope"),
    FeatureSpec("vibration_rms", "mean"),
    FeatureSpec(WAVE_CHANNEL, "rms"),
    FeatureSpec(WAVE_CHANNEL, "kurtosis"),
    FeatureSpec(WAVE_CHANNEL, "order1_frac"),
    FeatureSpec(WAVE_CHANNEL, "nonharmonic_frac"),
    FeatureSpec(WAVE_CHANNEL, "band:360-440"),
    FeatureSpec(WAVE_CHANNEL, f"order_frac:{BEARING_BPFO_ORDER:g}"),
)
#: Columns of ``FEATURES`` the score is conditioned on (spindle speed and load means).
GIVEN = (0, 1)
#: Scored only while the spindle turns at a steady speed (above 1000 rpm all window, speed
#: standard deviation below 20 rpm): idle, tool changes and ramps are not scored.
CONDITION = (
    (FeatureSpec("spindle_speed", "min"), 1000.0, float("inf")),
    (FeatureSpec("spindle_speed", "std"), 0.0, 20.0),
)


def windows(
    seed: int, index: int, seconds: float, faults: tuple[FaultEvent, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(t_rel [W] seconds since start at window end, X [W, F]) of one simulated machine."""
    from appliance.simulate.dataset import EPOCH_S

    ends, x, _ = features_from_frames(
        simulate_frames(seed, index, seconds, faults), FEATURES, WINDOW_S, condition=CONDITION
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
    model = fit_conditional_gaussian(train, GIVEN, QUANTILE)
    # The threshold must hold on machines the fit never saw (other programs, set points):
    # the reference distance is the larger of the training windows' QUANTILE and MARGIN times
    # the largest distance over CALIB_MACHINES held-out machines (another seed).
    calib = np.vstack(
        [windows(args.seed + 500, i, CALIB_MINUTES * 60)[1] for i in range(CALIB_MACHINES)]
    ).astype(np.float64)
    d_calib = model.score(calib) * model.s_ref
    s_ref = max(model.s_ref, MARGIN * float(d_calib.max()))
    model = GaussianModel(model.mean, model.whiten, s_ref)
    onnx_bytes = finish_model(model.onnx_graph(NAME))
    _, hold = windows(args.seed + 1, 0, 300)
    t_bad, bad = windows(args.seed + 2, 1, 300, (FaultEvent(100, "bearing_defect", 150),))
    in_fault = bad[(t_bad > 150.0) & (t_bad <= 250.0)]
    golden_in = np.vstack([hold[:8], in_fault[:8]]).astype(np.float32)
    golden_out = model.score(golden_in.astype(np.float64)).astype(np.float32)
    write_bundle(
        args.out,
        name=NAME,
        version=VERSION,
        description=(
            "conditional Mahalanobis score over sample features given spindle speed and load; "
            "1.0 = alert threshold"
        ),
        onnx_bytes=onnx_bytes,
        features=FEATURES,
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        extra={
            "kind": "gaussian",
            "given": [FEATURES[j].channel + ":" + FEATURES[j].stat for j in GIVEN],
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
