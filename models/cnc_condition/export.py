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
changing speed) are not scored. Windows, threshold rule and golden vectors: ``models.simulated``.
"""

from __future__ import annotations

from appliance.contracts import FeatureSpec
from appliance.modelkit.gaussian import fit_conditional_gaussian
from appliance.simulate.dataset import WAVE_CHANNEL
from appliance.simulate.machine import BEARING_BPFO_ORDER
from models.simulated import QUANTILE, calibrated, export

NAME = "cnc_condition"
VERSION = "2.0.0"
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


def main() -> None:
    export(
        __doc__,
        __file__,
        name=NAME,
        version=VERSION,
        description=(
            "conditional Mahalanobis score over sample features given spindle speed and load; "
            "1.0 = alert threshold"
        ),
        features=FEATURES,
        kind="gaussian",
        fit=lambda train, calib, seed: calibrated(
            fit_conditional_gaussian(train, GIVEN, QUANTILE), calib
        ),
        golden_fault="bearing_defect",
        extra={"given": [FEATURES[j].channel + ":" + FEATURES[j].stat for j in GIVEN]},
    )


if __name__ == "__main__":
    main()
