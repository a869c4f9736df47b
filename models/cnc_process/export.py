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
``models/cnc_condition`` (``models.simulated``): 1.0 = the larger of the training windows'
99.99th percentile and 1.1 × the highest score of 32 held-out machines.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.modelkit.gaussian import GaussianBank, fit_gaussian_bank
from models.simulated import F64, MARGIN, QUANTILE, export

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


def fit(train: F64, calib: F64, seed: int) -> GaussianBank:
    """The bank, each part's threshold by the rule of ``models.simulated`` on its own."""
    model = fit_gaussian_bank(train, [(GIVEN, part) for part in PARTS], QUANTILE)
    d_calib = model.part_scores(calib) * model.s_ref
    return dataclasses.replace(model, s_ref=np.maximum(model.s_ref, MARGIN * d_calib.max(axis=0)))


def main() -> None:
    export(
        __doc__,
        __file__,
        name=NAME,
        version=VERSION,
        description=(
            "largest of three conditional Mahalanobis scores given spindle speed and load "
            "(vibration RMS; coolant temperature and trend; spindle temperature and trend); "
            "1.0 = alert threshold"
        ),
        features=FEATURES,
        kind="gaussian_bank",
        fit=fit,
        golden_fault="coolant_loss",
        golden_after_s=200.0,
        waveform=False,
        extra={
            "given": [FEATURES[j].channel + ":" + FEATURES[j].stat for j in GIVEN],
            "parts": [[FEATURES[j].channel + ":" + FEATURES[j].stat for j in p] for p in PARTS],
        },
    )


if __name__ == "__main__":
    main()
