"""The shipped model bundle and the onnxruntime CPU engine (a real onnxruntime session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.infer import load_bundle, select_engine
from appliance.infer.bundle import MODELS_DIR


def test_shipped_model_passes_its_golden_parity_check_on_cpu() -> None:
    bundle = load_bundle("cnc_anomaly")
    engine, reason = select_engine(bundle)
    assert "no CUDA" in reason or "CUDA" in reason
    engine.start()
    try:
        assert engine.check_parity() <= bundle.golden_atol
        scores = engine.infer(bundle.golden_inputs)
        assert scores.shape == (len(bundle.golden_inputs),)
        # golden set = 8 normal windows, then faulty ones: normal scores stay below 1.0
        assert (scores[:8] < 1.0).all() and scores[8:].max() > 2.0
    finally:
        engine.close()
        engine.close()  # idempotent


def test_engine_counts_calls_and_rows_and_validates_input() -> None:
    bundle = load_bundle("cnc_anomaly")
    engine, _ = select_engine(bundle, max_batch=64)
    with pytest.raises(RuntimeError, match="before start"):
        engine.infer(bundle.golden_inputs)
    engine.start()
    calls = engine.stats.calls
    engine.infer(np.zeros((5, bundle.n_features), np.float32))
    assert engine.stats.calls == calls + 1 and engine.stats.last_ms > 0
    with pytest.raises(ValueError, match="features"):
        engine.infer(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="float32"):
        engine.infer(np.zeros((5, bundle.n_features), np.float64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size"):
        engine.infer(np.zeros((65, bundle.n_features), np.float32))
    engine.close()


def copy_model(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "cnc_anomaly", d)
    return d


def test_corrupt_onnx_file_is_refused_by_hash(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    data = bytearray((d / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(str(d))


def test_wrong_golden_vectors_make_the_engine_refuse_to_serve(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    with np.load(d / "golden.npz") as g:
        np.savez(d / "golden.npz", inputs=g["inputs"], outputs=g["outputs"] + 0.5)
    engine, _ = select_engine(load_bundle(str(d)))
    with pytest.raises(ModelError, match="parity"):
        engine.start()


def test_missing_manifest_field_names_the_manifest(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    del m["input"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="manifest.json: missing or invalid field"):
        load_bundle(str(d))


def test_unknown_model_name_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no manifest"):
        load_bundle("no_such_model")
