"""The per-machine self-baseline stage (manifest ``baseline``, appliance/infer/drift.py):
learning then freezing, per machine, per key value, the EWMA, the manifest's errors, and the
golden check that covers it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.contracts import FeatureRow, FeatureSpec
from appliance.errors import ModelError
from appliance.infer.bundle import MODELS_DIR, load_bundle
from appliance.infer.drift import DriftColumn, DriftSpec, DriftStage, sequence_scores
from appliance.infer.ort import OrtEngine
from appliance.modelkit.evaluate import score_windows

FEATS = (
    FeatureSpec("speed", "mean"),
    FeatureSpec("load", "mean"),
    FeatureSpec("temp", "mean"),
)


def _spec(learn: int = 3, ewma: float = 1.0, key: bool = True) -> DriftSpec:
    return DriftSpec(
        columns=(DriftColumn(1, "ratio", ewma), DriftColumn(2, "diff", ewma)),
        learn_windows=learn,
        key_index=0 if key else None,
        key_step=100.0,
    )


def _row(speed: float, load: float, temp: float) -> np.ndarray:
    return np.array([speed, load, temp], np.float32)


def test_the_stage_learns_each_machines_baseline_then_scores_deviations_from_it_frozen() -> None:
    st = DriftStage(_spec(learn=3))
    for load, temp in ((40.0, 20.0), (50.0, 22.0), (60.0, 24.0)):  # learning: nothing emitted
        assert st.transform("m1", _row(5000, load, temp)) is None
    assert st.learning_windows == 3
    np.testing.assert_allclose(st.baseline("m1", 50.0), [50.0, 22.0])
    out = st.transform("m1", _row(5000, 55.0, 23.0))
    assert out is not None
    np.testing.assert_allclose(out, [5000.0, 0.1, 1.0], rtol=1e-6)  # speed passes unchanged
    # frozen: a drift does not move the baseline
    for _ in range(50):
        st.transform("m1", _row(5000, 75.0, 30.0))
    np.testing.assert_allclose(st.baseline("m1", 50.0), [50.0, 22.0])
    np.testing.assert_allclose(st.transform("m1", _row(5000, 75.0, 30.0)), [5000, 0.5, 8.0])


def test_each_machine_learns_its_own_baseline_and_one_does_not_disturb_another() -> None:
    st = DriftStage(_spec(learn=2, ewma=0.5))
    for _ in range(2):
        st.transform("a", _row(5000, 40.0, 20.0))
    assert st.transform("b", _row(5000, 80.0, 25.0)) is None  # b still learns
    st.transform("b", _row(5000, 80.0, 25.0))
    a = st.transform("a", _row(5000, 44.0, 21.0))
    b = st.transform("b", _row(5000, 80.0, 25.0))
    np.testing.assert_allclose(a, [5000, 0.05, 0.5], rtol=1e-6)  # from 0, half the weight
    np.testing.assert_allclose(b, [5000, 0.0, 0.0], atol=1e-7)  # a's EWMA is not b's
    assert st.machines() == {"a": {"learned": 1, "learning": 0}, "b": {"learned": 1, "learning": 0}}


def test_each_key_value_has_its_own_baseline_rounded_to_the_step() -> None:
    st = DriftStage(_spec(learn=2))
    for speed, load in ((5001, 40.0), (4998, 40.0), (8002, 20.0)):
        st.transform("m", _row(speed, load, 20.0))
    assert st.transform("m", _row(8000, 30.0, 20.0)) is None  # key 80 is still learning
    np.testing.assert_allclose(st.baseline("m", 50.0), [40.0, 20.0])
    np.testing.assert_allclose(st.baseline("m", 80.0), [25.0, 20.0])
    np.testing.assert_allclose(
        st.transform("m", _row(4990, 44.0, 20.0)), [4990, 0.1, 0.0], atol=1e-6
    )
    np.testing.assert_allclose(
        st.transform("m", _row(8010, 30.0, 20.0)), [8010, 0.2, 0.0], atol=1e-6
    )
    no_key = DriftStage(_spec(learn=2, key=False))
    no_key.transform("m", _row(5000, 40.0, 20.0))
    no_key.transform("m", _row(8000, 20.0, 20.0))
    np.testing.assert_allclose(no_key.baseline("m"), [30.0, 20.0])


def test_the_ewma_accumulates_a_slow_ramp_across_windows_and_keys() -> None:
    st = DriftStage(_spec(learn=1, ewma=0.25))
    st.transform("m", _row(5000, 50.0, 20.0))
    st.transform("m", _row(6000, 50.0, 20.0))
    outs = [st.transform("m", _row(5000 + 1000 * (i % 2), 50.0, 22.0)) for i in range(8)]
    temps = [float(o[2]) for o in outs if o is not None]
    assert temps[0] == pytest.approx(0.5)  # 0.25 × 2 °C: one window is weak evidence ...
    assert np.all(np.diff(temps) > 0) and temps[-1] == pytest.approx(2.0 * (1 - 0.75**8))


def test_a_one_sided_column_scores_only_its_direction_and_its_ewma_is_not_clipped() -> None:
    spec = DriftSpec(
        columns=(DriftColumn(1, "ratio", 0.5, "up"), DriftColumn(2, "diff", 1.0, "down")),
        learn_windows=1,
        key_index=0,
        key_step=100.0,
    )
    st = DriftStage(spec)
    st.transform("m", _row(5000, 50.0, 20.0))
    # load below its baseline: clipped to 0 (as at the baseline); temperature above: clipped
    np.testing.assert_allclose(st.transform("m", _row(5000, 30.0, 21.0)), [5000, 0.0, 0.0])
    # the EWMA went on below 0 unclipped (-0.2): one row at + 20 % brings it back only to 0
    np.testing.assert_allclose(st.transform("m", _row(5000, 60.0, 19.0)), [5000, 0.0, -1.0])
    np.testing.assert_allclose(
        st.transform("m", _row(5000, 60.0, 19.0)), [5000, 0.1, -1.0], rtol=1e-6
    )
    both = DriftStage(_spec(learn=1, ewma=0.5))
    both.transform("m", _row(5000, 50.0, 20.0))
    np.testing.assert_allclose(both.transform("m", _row(5000, 30.0, 21.0)), [5000, -0.2, 0.5])


def test_wrap_sits_between_a_feature_builder_and_the_batcher() -> None:
    got: list[FeatureRow] = []
    submit = DriftStage(_spec(learn=1)).wrap(got.append)
    submit(FeatureRow("m", 1.0, _row(5000, 50.0, 20.0)))
    submit(FeatureRow("m", 2.0, _row(5000, 60.0, 20.0)))
    assert [r.window_end for r in got] == [2.0]
    np.testing.assert_allclose(got[0].vector, [5000, 0.2, 0.0], atol=1e-6)


def test_apply_over_a_machines_rows_equals_serving_them_one_by_one() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [rng.choice([3000.0, 5000.0], 60), rng.uniform(30, 60, 60), rng.uniform(20, 24, 60)]
    ).astype(np.float32)
    keep, rows = DriftStage(_spec(learn=4, ewma=0.3)).apply("m", x)
    got: list[FeatureRow] = []
    submit = DriftStage(_spec(learn=4, ewma=0.3)).wrap(got.append)
    for i, v in enumerate(x):
        submit(FeatureRow("m", float(i), v))
    assert keep.sum() == len(got) == 52
    np.testing.assert_array_equal(rows, np.vstack([r.vector for r in got]))


def test_a_row_with_a_missing_value_is_dropped_and_counted() -> None:
    st = DriftStage(_spec(learn=1))
    assert st.transform("m", _row(5000, float("nan"), 20.0)) is None
    assert st.invalid_windows == 1 and st.learning_windows == 0


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"columns": [{"channel": "load", "stat": "mean"}]}, "baseline.learn_windows"),
        ({"learn_windows": 0, "columns": [{"channel": "load", "stat": "mean"}]}, "learn_windows"),
        ({"learn_windows": 5, "columns": []}, "baseline.columns must be a non-empty list"),
        (
            {"learn_windows": 5, "columns": [{"channel": "load", "stat": "max"}]},
            "baseline.columns[0]: load:max is not one of the model's features",
        ),
        (
            {"learn_windows": 5, "columns": [{"channel": "load", "stat": "mean", "ewma": 0}]},
            "baseline.columns[0].ewma must be a number in (0, 1]",
        ),
        (
            {"learn_windows": 5, "columns": [{"channel": "load", "stat": "mean", "mode": "x"}]},
            "baseline.columns[0].mode",
        ),
        (
            {
                "learn_windows": 5,
                "columns": [
                    {"channel": "load", "stat": "mean"},
                    {"channel": "temp", "stat": "mean", "direction": "upward"},
                ],
            },
            "baseline.columns[1].direction must be one of ('both', 'up', 'down'), got 'upward'",
        ),
        (
            {
                "learn_windows": 5,
                "columns": [{"channel": "load", "stat": "mean"}],
                "key": {"channel": "speed", "stat": "mean", "step": -1},
            },
            "baseline.key.step",
        ),
    ],
)
def test_a_bad_baseline_value_is_refused_naming_the_manifest_key(
    baseline: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        DriftSpec.from_manifest(baseline, FEATS)
    assert message in str(err.value)


def test_the_spec_round_trips_through_the_manifest() -> None:
    spec = _spec(learn=7, ewma=0.2)
    assert DriftSpec.from_manifest(spec.to_manifest(FEATS), FEATS) == spec
    one_sided = DriftSpec((DriftColumn(1, "ratio", 0.1, "up"), DriftColumn(2, "diff", 1.0)), 5)
    entry = one_sided.to_manifest(FEATS)
    assert [c.get("direction") for c in entry["columns"]] == ["up", None]  # "both": the default
    assert DriftSpec.from_manifest(entry, FEATS) == one_sided


def _copy_bundle(tmp_path: Path, name: str = "cnc_drift") -> Path:
    d = tmp_path / name
    shutil.copytree(MODELS_DIR / name, d)
    return d


def test_a_bundle_without_baseline_has_no_stage_and_a_bad_one_names_the_key(
    tmp_path: Path,
) -> None:
    assert load_bundle("cnc_process").drift is None
    d = _copy_bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["baseline"]["columns"][1]["ewma"] = 1.5
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match=r"manifest.json.*baseline.columns\[1\].ewma"):
        load_bundle(str(d))


@pytest.mark.parametrize("name", ["cnc_drift", "cnc_wear"])
def test_the_shipped_drift_models_golden_sequence_covers_learning_and_scoring(name: str) -> None:
    b = load_bundle(name)
    assert b.drift is not None and b.sequence_inputs is not None
    assert b.sequence_outputs is not None
    want = b.sequence_outputs.astype(np.float64)
    learning = np.isnan(want)
    assert learning[: b.drift.learn_windows].all() and (~learning).sum() > 100
    got = sequence_scores(b.drift, b.sequence_inputs, lambda x: score_windows(b, x), 64)
    np.testing.assert_array_equal(np.isnan(got), learning)
    np.testing.assert_allclose(got[~learning], want[~learning], rtol=1e-4, atol=1e-4)
    assert np.nanmax(want) > b.threshold  # the sequence ends in a tool wear the model sees
    engine = OrtEngine(b)
    engine.start()  # the golden check, the sequence included
    try:
        assert engine.check_parity() <= 1e-3
    finally:
        engine.close()


def test_an_engine_refuses_a_bundle_whose_stage_does_not_reproduce_its_golden_sequence(
    tmp_path: Path,
) -> None:
    d = _copy_bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["baseline"]["columns"][0]["ewma"] = 0.5  # the graph is the same, the stage is not
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="golden-vector sequence parity check"):
        OrtEngine(load_bundle(str(d))).start()
    m["baseline"]["columns"][0]["ewma"] = 0.1
    m["baseline"]["columns"][0]["direction"] = "both"  # the load's decreases scored too
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="golden-vector sequence parity check"):
        OrtEngine(load_bundle(str(d))).start()
    m["baseline"]["columns"][0]["direction"] = "up"
    m["baseline"]["learn_windows"] = 31  # emits other rows than the golden sequence
    m["baseline"]["columns"][0]["ewma"] = 0.1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="golden sequence check"):
        OrtEngine(load_bundle(str(d))).start()


def test_a_release_whose_baseline_differs_is_not_a_drop_in_replacement(tmp_path: Path) -> None:
    """The learned per-machine state is kept across a model release, so a version with another
    stage is a configuration change (refused by model.release like other features)."""
    from appliance.runtime.model_store import same_layout

    serving = load_bundle("cnc_drift")
    d = _copy_bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = "1.0.1"
    (d / "manifest.json").write_text(json.dumps(m))
    assert same_layout(serving, load_bundle(str(d)))
    m["baseline"]["learn_windows"] = 60
    (d / "manifest.json").write_text(json.dumps(m))
    assert not same_layout(serving, load_bundle(str(d)))
