"""The conditional Gaussian score: anomalous for what a window shows at its operating point, not
for the operating point itself; its graph is the plain Gaussian's and reproduces its score."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.modelkit.export import finish_model, operator_check
from appliance.modelkit.gaussian import fit_conditional_gaussian, fit_gaussian


def _normal(n: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(3)
    speed = rng.uniform(3000.0, 11000.0, n)  # operating point
    vib = 0.2 + 0.13e-3 * speed + 0.02 * rng.standard_normal(n)  # follows the speed
    temp = 30.0 + 2e-3 * speed + 0.3 * rng.standard_normal(n)
    return np.column_stack([speed, vib, temp])


def test_a_window_off_its_operating_line_scores_high_and_an_unusual_speed_does_not() -> None:
    x = _normal()
    cond = fit_conditional_gaussian(x, given=[0], quantile=0.999)
    plain = fit_gaussian(x, quantile=0.999)
    assert cond.whiten.shape == (3, 2)
    # vibration of a 10 000 rpm spindle at 4 000 rpm: each value inside its healthy range
    off_line = np.array([[4000.0, 0.2 + 0.13e-3 * 10000.0, 30.0 + 2e-3 * 4000.0]])
    assert cond.score(off_line)[0] > 3.0
    # a speed above anything seen, everything else as it should be there
    fast = np.array([[20000.0, 0.2 + 0.13e-3 * 20000.0, 30.0 + 2e-3 * 20000.0]])
    assert cond.score(fast)[0] < 1.0 < plain.score(fast)[0]
    assert np.mean(cond.score(x) > 1.0) == pytest.approx(0.001, abs=0.0006)


def test_the_conditional_graph_reproduces_its_numpy_score() -> None:
    x = _normal()
    model = fit_conditional_gaussian(x, given=[0])
    blob = finish_model(model.onnx_graph("cond"))
    assert operator_check(onnx.load_from_string(blob)) == []
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"features": x[:64].astype(np.float32)})[0]
    np.testing.assert_allclose(got, model.score(x[:64]), rtol=1e-4, atol=1e-4)


def test_given_must_leave_something_to_score() -> None:
    x = _normal(200)
    for bad in ([], [0, 1, 2], [3]):
        with pytest.raises(ValueError, match="given"):
            fit_conditional_gaussian(x, given=bad)
