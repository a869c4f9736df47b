"""Sample features: the one function training and serving share."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.contracts import FeatureRow, FeatureSpec, Frame, Quality
from appliance.features.extract import window_features
from appliance.features.samples import SampleFeatureBuilder


def _frame(ts: np.ndarray, ch: np.ndarray, v: np.ndarray, channels: tuple[str, ...]) -> Frame:
    q = np.full(ts.shape, Quality.GOOD, np.uint8)
    return Frame("m1", channels, ts, ch.astype(np.int32), v, q)


def test_scalar_statistics_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(500) * 2 + 5
    ts = 1000.0 + np.arange(500) * 0.002
    stats = ("mean", "std", "min", "max", "rms", "p2p", "skew", "kurtosis", "crest", "slope")
    feats = tuple(FeatureSpec("a", s) for s in stats)
    got = window_features(feats, ("a",), ts, np.zeros(500, np.int32), x)
    d = x - x.mean()
    want = [
        x.mean(),
        x.std(),
        x.min(),
        x.max(),
        np.sqrt(np.mean(x * x)),
        np.ptp(x),
        np.mean(d**3) / x.std() ** 3,
        np.mean(d**4) / x.std() ** 4 - 3,
        np.abs(x).max() / np.sqrt(np.mean(x * x)),
        np.polyfit(ts - ts[0], x, 1)[0],
    ]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_constant_channel_has_zero_skew_and_kurtosis_and_unit_crest() -> None:
    feats = tuple(FeatureSpec("a", s) for s in ("skew", "kurtosis", "crest", "slope"))
    got = window_features(feats, ("a",), np.arange(10.0), np.zeros(10, np.int32), np.full(10, 3.0))
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, 0.0])


def test_spectral_features_find_a_tone() -> None:
    n, rate = 1000, 1000.0
    ts = np.arange(n) / rate
    x = np.sqrt(2) * np.sin(2 * np.pi * 120.0 * ts)  # RMS 1
    feats = (
        FeatureSpec("w", "dom_freq"),
        FeatureSpec("w", "centroid"),
        FeatureSpec("w", "band:100-150"),
        FeatureSpec("w", "band:200-300"),
    )
    got = window_features(feats, ("w",), ts, np.zeros(n, np.int32), x)
    assert got[0] == pytest.approx(120.0)
    assert got[1] == pytest.approx(120.0, abs=1.0)
    assert got[2] == pytest.approx(0.0, abs=0.05)  # 1.0 mm²/s² = 0 dB
    assert got[3] < -60.0


def test_order_frac_is_the_power_share_at_a_rotation_order_and_folds_at_nyquist() -> None:
    n, rate = 1000, 1000.0
    ts = np.arange(n) / rate
    shaft = np.sin(2 * np.pi * 100.0 * ts)  # f0 = 100 Hz dominates: power 0.5
    feats = (FeatureSpec("w", "order_frac:3.58"), FeatureSpec("w", "order_frac:1"))
    healthy = window_features(feats, ("w",), ts, np.zeros(n, np.int32), shaft)
    assert healthy[0] == pytest.approx(0.0, abs=1e-6)
    assert healthy[1] == pytest.approx(1.0)
    tone = 0.5 * np.sin(2 * np.pi * 358.0 * ts)  # power 0.125: a fifth of the total
    got = window_features(feats, ("w",), ts, np.zeros(n, np.int32), shaft + tone)
    assert got[0] == pytest.approx(0.2, abs=1e-3)
    # at f0 = 150 Hz the order-3.58 tone (537 Hz) is sampled at 463 Hz: it is found there
    shaft150 = np.sin(2 * np.pi * 150.0 * ts)
    alias = 0.5 * np.sin(2 * np.pi * 537.0 * ts)
    got = window_features(feats, ("w",), ts, np.zeros(n, np.int32), shaft150 + alias)
    assert got[0] == pytest.approx(0.2, abs=1e-3)


def test_order_frac_leaves_out_a_tone_aliased_onto_a_harmonic() -> None:
    """At f0 = 152 Hz, order 3.58 (544 Hz) folds to 456 Hz, 0 Hz from 3·f0: a harmonic there
    is not counted as the tone (a healthy spindle would look faulty at that speed)."""
    n, rate = 1000, 1000.0
    ts = np.arange(n) / rate
    x = np.sin(2 * np.pi * 152.0 * ts) + 0.25 * np.sin(2 * np.pi * 456.0 * ts)
    got = window_features(
        (FeatureSpec("w", "order_frac:3.58"),), ("w",), ts, np.zeros(n, np.int32), x
    )
    assert got[0] == pytest.approx(0.0, abs=1e-6)


def test_a_malformed_order_is_not_a_statistic() -> None:
    from appliance.contracts import is_sample_feature_stat

    assert is_sample_feature_stat("order_frac:3.58")
    for bad in ("order_frac:", "order_frac:x", "order_frac:-1", "order_frac:0", "order_frac:inf"):
        assert not is_sample_feature_stat(bad), bad


def test_a_missing_channel_gives_nan_and_the_window_is_not_scored() -> None:
    rows: list[FeatureRow] = []
    specs = (FeatureSpec("a", "mean"), FeatureSpec("b", "std"))
    fb = SampleFeatureBuilder(1.0, specs, rows.append, skip_first=False)
    channels = ("a", "b")
    fb.on_frame(_frame(np.array([10.1, 10.2]), np.array([0, 0]), np.array([1.0, 2.0]), channels))
    fb.on_frame(_frame(np.array([11.1]), np.array([0]), np.array([1.0]), channels))
    assert rows == [] and fb.incomplete_windows == 1


def test_a_frame_across_a_window_boundary_is_split_by_sample_time() -> None:
    rows: list[FeatureRow] = []
    fb = SampleFeatureBuilder(1.0, (FeatureSpec("a", "mean"),), rows.append, skip_first=False)
    ts = np.array([10.5, 10.9, 11.1, 11.3])
    fb.on_frame(_frame(ts, np.zeros(4), np.array([1.0, 3.0, 10.0, 20.0]), ("a",)))
    fb.flush()
    assert [(r.window_end, float(r.vector[0])) for r in rows] == [(11.0, 2.0), (12.0, 15.0)]


def test_windows_outside_the_condition_are_counted_and_not_scored() -> None:
    rows: list[FeatureRow] = []
    cond = ((FeatureSpec("speed", "min"), 1000.0, float("inf")),)
    fb = SampleFeatureBuilder(
        1.0, (FeatureSpec("load", "mean"),), rows.append, cond, skip_first=False
    )
    channels = ("speed", "load")
    for k, speed in enumerate([0.0, 5000.0, 800.0]):
        t = np.array([10.2 + k, 10.2 + k, 10.6 + k, 10.6 + k])
        fb.on_frame(_frame(t, np.array([0, 1, 0, 1]), np.array([speed, 3.0, speed, 5.0]), channels))
    fb.flush()
    assert [(r.window_end, float(r.vector[0])) for r in rows] == [(12.0, 4.0)]
    assert fb.unscored_windows == 2 and fb.incomplete_windows == 0


def test_each_machines_first_window_is_partial_and_not_scored() -> None:
    rows: list[FeatureRow] = []
    fb = SampleFeatureBuilder(1.0, (FeatureSpec("a", "std"),), rows.append)
    for k in range(3):  # acquisition starts at 10.8: window 10..11 holds 0.2 s of it
        t = np.array([10.8, 10.9]) + k
        fb.on_frame(_frame(t, np.zeros(2), np.array([1.0, 2.0]), ("a",)))
    fb.flush()
    assert [r.window_end for r in rows] == [12.0, 13.0]
    assert fb.partial_windows == 1
