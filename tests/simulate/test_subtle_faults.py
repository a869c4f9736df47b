"""The subtle simulator faults: each changes what it should and (nearly) nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.simulate.dataset import WAVE_CHANNEL, FaultEvent, simulate_frames
from appliance.simulate.machine import SUBTLE_FAULT_KINDS, CncMachine


def _run(kind: str | None, feats: tuple[FeatureSpec, ...]) -> np.ndarray:
    faults = (FaultEvent(20.0, kind, 60.0),) if kind else ()
    _, x, _ = features_from_frames(simulate_frames(3, 1, 80.0, faults), feats, 1.0)
    return x[25:78].astype(np.float64)


@pytest.mark.parametrize("kind", SUBTLE_FAULT_KINDS)
def test_a_subtle_fault_is_injectable_and_ends(kind: str) -> None:
    m = CncMachine(seed=1)
    m.inject(kind, 2.0)
    assert kind in m.active_faults
    for _ in range(30):
        m.step(0.1)
    assert kind not in m.active_faults


def test_bearing_defect_adds_a_tone_but_barely_changes_rms() -> None:
    feats = (FeatureSpec("vibration_rms", "mean"), FeatureSpec(WAVE_CHANNEL, "kurtosis"))
    feats += (FeatureSpec(WAVE_CHANNEL, "band:150-500"),)
    healthy, faulty = _run(None, feats), _run("bearing_defect", feats)
    spinning = healthy[:, 0] > 0.8
    rms_ratio = faulty[spinning, 0].mean() / healthy[spinning, 0].mean()
    assert 1.0 < rms_ratio < 1.06
    assert not np.allclose(faulty[spinning, 2], healthy[spinning, 2])


def test_coolant_loss_drifts_coolant_and_spindle_up() -> None:
    feats = (FeatureSpec("coolant_temp", "mean"), FeatureSpec("spindle_temp", "mean"))
    healthy, faulty = _run(None, feats), _run("coolant_loss", feats)
    rise = faulty[-1] - healthy[-1]
    assert 3.0 < rise[0] < 5.5
    assert rise[1] > rise[0]


def test_tool_wear_raises_cutting_load_only_while_active() -> None:
    feats = (FeatureSpec("spindle_load", "max"),)
    healthy, faulty = _run(None, feats), _run("tool_wear", feats)
    assert faulty[-10:, 0].mean() > healthy[-10:, 0].mean()
    assert np.all(faulty[:5, 0] - healthy[:5, 0] < 5.0)
