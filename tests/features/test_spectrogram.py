"""Spectrogram image features: shape and layout, where a tone lands, determinism, incomplete
windows, the manifest round trip, and serving computing exactly what a training script does."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from appliance.contracts import (
    FeatureSpec,
    Frame,
    Quality,
    SpectrogramSpec,
    features_from_manifest,
    features_to_manifest,
    is_sample_feature_stat,
)
from appliance.errors import ModelError
from appliance.features.extract import check_specs, window_features
from appliance.features.samples import SampleFeatureBuilder, features_from_frames
from appliance.features.spectrogram import spectrogram_image
from appliance.infer.bundle import load_bundle
from appliance.simulate.dataset import WAVE_CHANNEL, simulate_frames

SPEC = SpectrogramSpec(
    height=32, width=16, nperseg=128, hop=32, rate_hz=1000.0, min_samples=900,
    offset_db=-40.0, scale_db=10.0,
)  # fmt: skip
EPOCH = 1.7e9


def _tone(freq_hz: float, n: int = 1000, rate_hz: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(n) / rate_hz
    rng = np.random.default_rng(0)
    x = np.sin(2 * np.pi * freq_hz * t) + 0.01 * rng.standard_normal(n)
    return EPOCH + t, x


def _features(specs: tuple[FeatureSpec, ...], ts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """window_features over one waveform channel ``w`` and a scalar channel ``a``."""
    t = np.concatenate([ts, EPOCH + 0.1 * np.arange(5)])
    ch = np.concatenate([np.ones(len(ts), np.int32), np.zeros(5, np.int32)])
    v = np.concatenate([x, np.full(5, 2.0)])
    return window_features(specs, ("a", "w"), t, ch, v)


def test_an_image_is_laid_out_row_major_between_the_other_features() -> None:
    specs = (FeatureSpec("a", "mean"), *SPEC.columns("w"), FeatureSpec("w", "rms"))
    ts, x = _tone(200.0)
    out = _features(specs, ts, x)
    assert out.dtype == np.float32 and out.shape == (1 + 32 * 16 + 1,)
    assert out[0] == 2.0 and out[-1] == pytest.approx(np.sqrt(np.mean(x * x)), rel=1e-6)
    img = spectrogram_image(ts - ts[0], x, SPEC)
    assert img.shape == (32, 16) and img.dtype == np.float32
    np.testing.assert_array_equal(out[1:-1], img.ravel())


@pytest.mark.parametrize("row", [0, 5, 10, 20, 31])
def test_a_tone_lands_in_its_frequency_row_in_every_column(row: int) -> None:
    # 64 bins of 7.8125 Hz (DC left out) averaged two by two: row r holds bins 2r+1 and 2r+2
    freq = (2 * row + 1.5) * 1000.0 / 128
    ts, x = _tone(freq)
    img = spectrogram_image(ts, x, SPEC)
    assert (np.argmax(img, axis=0) == row).all()
    # a sine of RMS 1/√2 is 0.5 (−3 dB) of mean-square power; the area resize spreads it over
    # its row's two bins (window leakage), so the row holds a few dB less
    peak_db = img[row].mean() * SPEC.scale_db + SPEC.offset_db
    assert -10.0 < peak_db < -3.0
    assert np.median(img) * SPEC.scale_db + SPEC.offset_db < peak_db - 40.0


def test_the_image_is_deterministic_and_follows_the_normalisation() -> None:
    ts, x = _tone(123.0)
    a = spectrogram_image(ts, x, SPEC)
    np.testing.assert_array_equal(a, spectrogram_image(ts.copy(), x.copy(), SPEC))
    raw = spectrogram_image(ts, x, replace(SPEC, offset_db=0.0, scale_db=1.0))
    np.testing.assert_allclose(a, (raw + 40.0) / 10.0, rtol=1e-5, atol=1e-5)


def test_a_longer_window_is_resized_to_the_same_shape() -> None:
    ts, x = _tone(300.0, n=2000)
    assert spectrogram_image(ts, x, SPEC).shape == (32, 16)


@pytest.mark.parametrize(
    "n, rate_hz", [(899, 1000.0), (100, 1000.0), (0, 1000.0), (1000, 1500.0), (1000, 960.0)]
)
def test_too_few_samples_or_another_rate_give_an_incomplete_window(n: int, rate_hz: float) -> None:
    ts, x = _tone(100.0, n=n, rate_hz=rate_hz)
    out = _features((FeatureSpec("a", "mean"), *SPEC.columns("w")), ts, x)
    assert out[0] == 2.0
    assert np.isnan(out[1:]).all()


def test_a_window_without_enough_samples_is_counted_incomplete_not_scored() -> None:
    rows: list[object] = []
    fb = SampleFeatureBuilder(1.0, SPEC.columns("w"), rows.append, skip_first=False)
    for start, n in ((0.0, 1000), (1.0, 500)):  # a full window, then half of one (FIFO overrun)
        ts, x = _tone(100.0, n=n)
        good = np.full(n, Quality.GOOD, np.uint8)
        fb.on_frame(Frame("m", ("w",), ts + start, np.zeros(n, np.int32), x, good))
    fb.flush()
    assert len(rows) == 1 and fb.incomplete_windows == 1


def test_the_manifest_names_an_image_once_and_loads_back_to_its_columns() -> None:
    specs = (FeatureSpec("a", "mean"), *SPEC.columns("w"), FeatureSpec("w", "std"))
    entries = features_to_manifest(specs)
    assert entries[1] == {
        "channel": "w",
        "stat": "spectrogram",
        "shape": [32, 16],
        "nperseg": 128,
        "hop": 32,
        "rate_hz": 1000.0,
        "min_samples": 900,
        "offset_db": -40.0,
        "scale_db": 10.0,
    }
    assert len(entries) == 3
    assert features_from_manifest(json.loads(json.dumps(entries))) == specs
    assert all(is_sample_feature_stat(f.stat) for f in specs)


def test_a_bad_spectrogram_entry_or_partial_image_is_refused() -> None:
    entry = SPEC.manifest_entry("w")
    with pytest.raises(ValueError, match=r"features\[0\].*nperseg"):
        features_from_manifest([{k: v for k, v in entry.items() if k != "nperseg"}])
    with pytest.raises(ValueError, match=r"features\[0\].*scale_db"):
        features_from_manifest([{**entry, "scale_db": 0.0}])
    with pytest.raises(ValueError, match="min_samples"):
        features_from_manifest([{**entry, "min_samples": 10}])
    with pytest.raises(ValueError, match="incomplete"):
        check_specs(SPEC.columns("w")[:-1])
    assert not is_sample_feature_stat(SPEC.stat(32 * 16))
    assert not is_sample_feature_stat("spectrogram(32x16)[0]")


def test_a_bundle_with_a_malformed_spectrogram_entry_names_the_entry(tmp_path: Path) -> None:
    src = load_bundle("cnc_condition").directory
    for f in ("model.onnx", "golden.npz"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    m = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    m["features"][0] = {**SPEC.manifest_entry("vibration_wave"), "shape": [32]}
    (tmp_path / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(ModelError, match=r"manifest.json.*features\[0\]"):
        load_bundle(str(tmp_path))


def test_serving_computes_exactly_what_training_computed_from_the_simulator() -> None:
    feats = SPEC.columns(WAVE_CHANNEL)
    frames = list(simulate_frames(5, 1, 30.0))
    _, x, incomplete = features_from_frames(frames, feats, 1.0)
    assert incomplete == 0 and x.shape == (29, 32 * 16)  # the first (partial) window dropped
    # the same windows cut by hand from the frames, through window_features
    ts = np.concatenate([f.ts for f in frames])
    ch = np.concatenate([f.channel for f in frames])
    val = np.concatenate([f.value for f in frames])
    k = np.floor(ts)
    first = np.unique(k)[1]
    sel = k == first
    want = window_features(feats, frames[0].channels, ts[sel], ch[sel], val[sel])
    np.testing.assert_array_equal(x[0], want)


def test_opencv_is_imported_only_for_an_image_and_its_absence_names_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    code = (
        "import sys, appliance.features.samples, appliance.infer.bundle as b; "
        "b.load_bundle('cnc_condition'); assert 'cv2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import appliance.features.spectrogram as sg

    monkeypatch.setattr(sg, "_cv2", None)
    monkeypatch.setitem(sys.modules, "cv2", None)  # what `import cv2` sees when not installed
    ts, x = _tone(100.0)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        spectrogram_image(ts, x, SPEC)
