"""Train and export the CNC autoencoder: reconstruction error over the cnc_condition features.

    python -m models.cnc_autoencoder.export [--out DIR] [--seed N] [--minutes M]

Needs the ``train`` extra (PyTorch, CPU). Same windows, features and condition as
``models/cnc_condition`` (``FEATURES``, ``CONDITION``: spindle turning steadily), same training
and calibration machines; model: ``appliance.modelkit.autoencoder`` (12 → 32 → 4 → 32 → 12,
ReLU), score = mean squared reconstruction error of the standardised features over its
reference, with the threshold rule of cnc_condition (the training windows' 99.99th percentile
or 1.1 × the highest score of 32 held-out machines, whichever is larger; ``models.simulated``).
Deterministic.
"""

from __future__ import annotations

from appliance.modelkit.autoencoder import AutoencoderModel, fit_autoencoder
from models.cnc_condition.export import FEATURES
from models.simulated import F64, QUANTILE, calibrated, export

NAME = "cnc_autoencoder"
VERSION = "2.0.0"


def fit(train: F64, calib: F64, seed: int) -> AutoencoderModel:
    model = fit_autoencoder(train, QUANTILE, hidden=32, bottleneck=4, epochs=80, seed=seed)
    return calibrated(model, calib)


def main() -> None:
    export(
        __doc__,
        __file__,
        name=NAME,
        version=VERSION,
        description="autoencoder reconstruction error over sample features; 1.0 = threshold",
        features=FEATURES,
        kind="autoencoder",
        fit=fit,
        golden_fault="chatter",
        golden_rtol=1e-3,
        golden_atol=1e-4,
    )


if __name__ == "__main__":
    main()
