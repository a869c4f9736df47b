"""The shipped sample-feature models: their golden inputs are what the serving code computes
from the simulator, their graphs pass the operator check and reproduce their golden outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from appliance.features.samples import features_from_frames
from appliance.infer.bundle import load_bundle
from appliance.modelkit.evaluate import score_windows
from appliance.modelkit.export import operator_check
from appliance.simulate.dataset import simulate_frames


@pytest.mark.parametrize(
    "name", ["cnc_condition", "cnc_autoencoder", "cnc_process", "cnc_spectrogram"]
)
def test_a_shipped_model_is_served_exactly_the_features_it_was_trained_on(name: str) -> None:
    b = load_bundle(name)
    assert b.needs_samples and b.condition
    # export.py: golden rows 0-7 are the first scored windows of seed 1001, machine 0
    _, x, _ = features_from_frames(
        simulate_frames(1001, 0, 300), b.features, b.window_s, condition=b.condition
    )
    np.testing.assert_array_equal(x[:8], b.golden_inputs[:8])
    got = score_windows(b, b.golden_inputs)
    np.testing.assert_allclose(got, b.golden_outputs, rtol=b.golden_rtol, atol=b.golden_atol)
    assert operator_check(onnx.load(str(b.onnx_path))) == []
    assert b.golden_outputs[:8].max() < b.threshold  # healthy windows; 8: are in a fault


@pytest.mark.parametrize(
    ("name", "kind", "seed", "index"),
    [
        ("cnc_condition", "bearing_defect", 7003, 3),  # version 1 never raised on a bearing
        ("cnc_process", "coolant_loss", 7001, 1),  # nor cnc_condition 1 on a coolant loss
        ("cnc_process", "temp_ramp", 7002, 2),
    ],
)
def test_a_shipped_model_raises_on_a_fault_of_an_unseen_machine_and_not_on_its_healthy_twin(
    name: str, kind: str, seed: int, index: int
) -> None:
    """The score alert rule of image/config/appliance.toml (2 of 3 windows above the
    threshold) raises during a 150 s fault, and never on the same machine without it."""
    from appliance.modelkit.metrics import debounced_raises
    from appliance.simulate.dataset import EPOCH_S, FaultEvent

    b = load_bundle(name)
    runs = []
    for faults in ((FaultEvent(100.0, kind, 150.0),), ()):
        ends, x, _ = features_from_frames(
            simulate_frames(seed, index, 250, faults),
            b.features,
            b.window_s,
            condition=b.condition,
        )
        t = ends - EPOCH_S
        runs.append(debounced_raises(t, score_windows(b, x), b.threshold, 2, 3))
    faulty, healthy = runs
    assert healthy == []
    assert faulty and 100.0 < faulty[0] <= 250.0


def test_cnc_process_serves_a_machine_without_the_vibration_waveform(tmp_path: Path) -> None:
    from appliance.config import parse_config
    from appliance.runtime.checks import served_models

    dev = {"name": "cnc-1", "host": "127.0.0.1", "profile": "cnc-sim"}  # no [devices.waveform]
    cfg = parse_config(
        {
            "devices": [dev],
            "models": [{"name": "process", "model": "cnc_process"}],
            "outbox": {"path": "o.sqlite"},
        },
        base_dir=tmp_path,
    )
    served_models(cfg)  # raises ConfigError listing missing channels
    assert all(f.channel != "vibration_wave" for f in load_bundle("cnc_process").features)


def test_the_spectrogram_classifier_names_its_image_once_and_its_classes() -> None:
    import json

    import onnxruntime as ort

    b = load_bundle("cnc_spectrogram")
    m = json.loads((b.directory / "manifest.json").read_text(encoding="utf-8"))
    (entry,) = m["features"]
    assert entry["stat"] == "spectrogram" and entry["channel"] == "vibration_wave"
    h, w = entry["shape"]
    assert b.n_features == h * w == b.golden_inputs.shape[1]
    assert m["classes"][0] == "healthy" and "bearing_defect" in m["classes"]
    assert b.onnx_path.stat().st_size < 1 << 20
    sess = ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["score", "class_probs"]
    score, probs = sess.run(None, {b.input_name: b.golden_inputs})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    p_ref = m["training"]["p_ref"]
    np.testing.assert_allclose(score, (1.0 - probs[:, 0]) / p_ref, rtol=1e-4, atol=1e-5)
    # golden rows 8-15 are windows inside a bearing defect (export.py)
    assert (np.argmax(probs[8:], axis=1) == m["classes"].index("bearing_defect")).mean() >= 0.75
    assert (np.argmax(probs[:8], axis=1) == 0).all()
