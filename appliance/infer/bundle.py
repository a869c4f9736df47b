"""A shipped model: ONNX file + manifest (feature layout, I/O names) + golden vectors.

Layout of a model directory (``models/<name>/``)::

    manifest.json   name, version, input/output names, feature layout, sha256 of the ONNX file,
                    golden_atol / golden_rtol (parity tolerances), fp16 (may TensorRT use FP16),
                    threshold (alert level of the score), condition (feature ranges outside
                    which a window is not scored), baseline (the per-machine self-baseline
                    stage, appliance/infer/drift.py); the contract is docs/models.md
    model.onnx      the graph; input [N, F] float32, output [N] float32 (a graph may have
                    further outputs, e.g. a classifier's per-class probabilities: not served)
    golden.npz      arrays ``inputs`` [G, F] and ``outputs`` [G] the engine must reproduce;
                    with a ``baseline`` also ``sequence_inputs`` [S, F] (one machine's raw rows
                    in order) and ``sequence_outputs`` [S] (their scores through a fresh stage,
                    NaN while it learns)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contracts import FEATURE_STATS as STATS
from appliance.contracts import FeatureSpec, features_from_manifest, is_sample_feature_stat
from appliance.errors import ModelError
from appliance.infer.drift import DriftSpec

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class ModelBundle:
    name: str
    version: str
    directory: Path
    onnx_path: Path
    onnx_sha256: str
    input_name: str
    output_name: str
    features: tuple[FeatureSpec, ...]
    window_s: float
    golden_inputs: np.ndarray
    golden_outputs: np.ndarray
    golden_atol: float
    manifest: dict[str, Any]
    #: relative tolerance of the golden check: pass when |got - want| <= atol + rtol * |want|
    golden_rtol: float = 0.0
    #: the manifest's ``"fp16": true``: the model may be built in FP16 (TensorRT)
    allow_fp16: bool = False
    #: the manifest's ``condition``: (feature, min, max) ranges a window must be inside to be
    #: scored (e.g. "spindle turning"); outside them the window is not scored
    condition: tuple[tuple[FeatureSpec, float, float], ...] = ()
    #: the manifest's ``threshold``: the score above which a window is anomalous
    threshold: float = 1.0
    #: the manifest's ``baseline``: the per-machine self-baseline stage (None: rows are scored
    #: as the feature builders make them)
    drift: DriftSpec | None = None
    #: with a ``baseline``: the golden sequence of one machine's raw rows and its scores
    sequence_inputs: np.ndarray | None = None
    sequence_outputs: np.ndarray | None = None

    @property
    def needs_samples(self) -> bool:
        """Whether serving needs the windows' raw samples (sample statistics or a condition)."""
        return bool(self.condition) or any(f.stat not in STATS for f in self.features)

    @property
    def n_features(self) -> int:
        return len(self.features)


def model_dir(model: str) -> Path:
    """``model`` is a shipped model name (``cnc_anomaly``), a model directory, or an .onnx path."""
    p = Path(model)
    if p.suffix == ".onnx":
        return p.parent
    if p.is_absolute() or "/" in model:
        return p
    return MODELS_DIR / model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(model: str) -> ModelBundle:
    """Load and verify a model bundle. Raises :class:`ModelError` naming the file at fault."""
    d = model_dir(model)
    manifest_path = d / "manifest.json"
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model {model!r}: no manifest at {manifest_path}") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"model {model!r}: unreadable manifest {manifest_path}: {err}") from None
    try:
        onnx_path = d / m["onnx"]
        features = features_from_manifest(m["features"])  # a spectrogram: its pixel columns
        for f in features:
            if not is_sample_feature_stat(f.stat):
                raise ModelError(f"{manifest_path}: feature {f.channel}: unknown stat {f.stat!r}")
        condition = tuple(
            (
                FeatureSpec(str(c["channel"]), str(c["stat"])),
                float(c.get("min", float("-inf"))),
                float(c.get("max", float("inf"))),
            )
            for c in m.get("condition", ())
        )
        for spec, _, _ in condition:
            if not is_sample_feature_stat(spec.stat):
                raise ModelError(f"{manifest_path}: condition {spec.channel}: unknown stat")
        expected_sha = str(m["onnx_sha256"])
        golden_path = d / m["golden"]
        bundle_fields = dict(
            name=str(m["name"]),
            version=str(m["version"]),
            input_name=str(m["input"]),
            output_name=str(m["output"]),
            window_s=float(m["window_s"]),
            golden_atol=float(m.get("golden_atol", 1e-4)),
            golden_rtol=float(m.get("golden_rtol", 0.0)),
            allow_fp16=m.get("fp16", False),
            condition=condition,
            threshold=float(m.get("threshold", 1.0)),
        )
        if "baseline" in m:
            bundle_fields["drift"] = DriftSpec.from_manifest(m["baseline"], features)
        for tol in ("golden_atol", "golden_rtol"):
            value = bundle_fields[tol]
            if not 0 <= value < float("inf"):
                raise ValueError(f"{tol} must be a finite number >= 0, got {value}")
        if not isinstance(bundle_fields["allow_fp16"], bool):
            raise ValueError(f"fp16 must be true or false, got {bundle_fields['allow_fp16']!r}")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{manifest_path}: missing or invalid field: {err}") from None
    if not onnx_path.is_file():
        raise ModelError(f"model {model!r}: ONNX file {onnx_path} is missing")
    actual_sha = _sha256(onnx_path)
    if actual_sha != expected_sha:
        raise ModelError(
            f"model {model!r}: {onnx_path} sha256 {actual_sha[:12]}… does not match the "
            f"manifest's {expected_sha[:12]}… (corrupt or replaced file)"
        )
    try:
        with np.load(golden_path) as g:
            gin = np.asarray(g["inputs"], dtype=np.float32)
            gout = np.asarray(g["outputs"], dtype=np.float32)
            seq_in = seq_out = None
            if bundle_fields.get("drift") is not None:
                seq_in = np.asarray(g["sequence_inputs"], dtype=np.float32)
                seq_out = np.asarray(g["sequence_outputs"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise ModelError(f"model {model!r}: golden vectors {golden_path}: {err}") from None
    if gin.ndim != 2 or gin.shape[1] != len(features) or gout.shape != (gin.shape[0],):
        raise ModelError(
            f"model {model!r}: golden vectors have shapes {gin.shape}/{gout.shape}, "
            f"expected [G, {len(features)}]/[G]"
        )
    if (
        seq_in is not None
        and seq_out is not None
        and (
            seq_in.ndim != 2 or seq_in.shape[1] != len(features) or seq_out.shape != (len(seq_in),)
        )
    ):
        raise ModelError(
            f"model {model!r}: golden sequence has shapes {seq_in.shape}/{seq_out.shape}, "
            f"expected [S, {len(features)}]/[S] (manifest key baseline)"
        )
    return ModelBundle(
        directory=d,
        onnx_path=onnx_path,
        onnx_sha256=actual_sha,
        features=features,
        golden_inputs=gin,
        golden_outputs=gout,
        sequence_inputs=seq_in,
        sequence_outputs=seq_out,
        manifest=m,
        **bundle_fields,
    )
