"""The conditional Gaussian score: anomalous for what a window shows at its operating point, not
for the operating point itself; its graph is the plain Gaussian's and reproduces its score."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.modelkit.export import finish_model, operator_check
from appliance.modelkit.gaussian import fit_conditional_gaussian, fit_gaussian, fit_gaussian_bank


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


def test_a_bank_scores_the_worst_of_its_parts_and_its_graph_reproduces_it() -> None:
    x = _normal()
    bank = fit_gaussian_bank(x, [([0], [1]), ([0], [2])], quantile=0.999)
    assert bank.whiten.shape == (3, 2) and bank.pool.shape == (2, 2)
    # vibration off its line only: part 0 fires, and the bank with it
    off = np.array([[4000.0, 0.2 + 0.13e-3 * 10000.0, 30.0 + 2e-3 * 4000.0]])
    parts = bank.part_scores(off)[0]
    assert parts[0] > 3.0 > 1.0 > parts[1]
    assert bank.score(off)[0] == parts[0]
    # one vibration feature is not averaged with the temperature: the bank sees more of it
    whole = fit_conditional_gaussian(x, given=[0], quantile=0.999)
    assert bank.score(off)[0] > whole.score(off)[0]
    np.testing.assert_allclose(bank.part_scores(x).max(axis=0) > 1.0, [True, True])
    blob = finish_model(bank.onnx_graph("bank"))
    assert operator_check(onnx.load_from_string(blob)) == []
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"features": np.vstack([x[:63], off]).astype(np.float32)})[0]
    np.testing.assert_allclose(got, bank.score(np.vstack([x[:63], off])), rtol=1e-4, atol=1e-4)


def test_a_bank_part_must_name_distinct_existing_columns() -> None:
    x = _normal(200)
    for parts in ([], [([0], [])], [([0], [0])], [([0], [3])]):
        with pytest.raises(ValueError):
            fit_gaussian_bank(x, parts)
