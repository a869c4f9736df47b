"""Bundle writing: ONNX serialisation with a fixed IR version and opset, the TensorRT operator
check, golden vectors and the manifest (the contract in ``docs/models.md``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureSpec, features_to_manifest
from appliance.errors import ModelError

#: ONNX opset and IR version of every export: onnxruntime ≥ 1.17 and TensorRT 10.3 load both.
OPSET, IR_VERSION = 17, 10
#: Highest opset / IR version TensorRT 10.3's ONNX parser accepts.
TRT_MAX_OPSET, TRT_MAX_IR_VERSION = 20, 10
#: Operators of the default domain TensorRT 10.3 cannot compile (or only with plugins).
TRT_UNSUPPORTED_OPS = frozenset(
    {"Loop", "If", "Scan", "SequenceConstruct", "SequenceAt", "StringNormalizer", "Unique"}
)


def operator_check(model: Any) -> list[str]:
    """Problems TensorRT 10.3 would have with ``model`` (an ``onnx.ModelProto``): empty = fine.

    Flags nodes outside the default ONNX domain (``ai.onnx.ml`` tree ensembles, scalers, …),
    operators of :data:`TRT_UNSUPPORTED_OPS`, and an IR version or opset above what it parses.
    """
    problems: list[str] = []
    if model.ir_version > TRT_MAX_IR_VERSION:
        problems.append(f"IR version {model.ir_version} > {TRT_MAX_IR_VERSION}")
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > TRT_MAX_OPSET:
            problems.append(f"opset {imp.version} > {TRT_MAX_OPSET}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type}: {node.domain}.{node.op_type}")
        elif node.op_type in TRT_UNSUPPORTED_OPS:
            problems.append(f"node {node.name or node.op_type}: {node.op_type}")
    return problems


def finish_model(graph: Any, *, producer: str = "appliance-modelkit") -> bytes:
    """Wrap ``graph`` into a model at :data:`OPSET`/:data:`IR_VERSION`, check it with the ONNX
    checker and :func:`operator_check`, and serialise it. Needs the ``onnx`` package."""
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    problems = operator_check(model)
    if problems:
        raise ModelError("TensorRT 10.3 cannot compile this graph: " + "; ".join(problems))
    return bytes(model.SerializeToString())


def score_graph(
    nodes: Sequence[Any],
    name: str,
    n_features: int,
    initializer: Sequence[Any],
    extra_outputs: Sequence[Any] = (),
) -> Any:
    """The graph of a bundle (the contract in ``docs/models.md``): ``nodes`` from the input
    ``features`` [batch, ``n_features``] float32 to the output ``score`` [batch] float32, then
    ``extra_outputs`` (value infos, not served). Needs the ``onnx`` package."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]), *extra_outputs],
        initializer=initializer,
    )


def condition_manifest(
    condition: Sequence[tuple[FeatureSpec, float, float]],
) -> list[dict[str, Any]]:
    """A model's ``condition`` (feature, lowest, highest value a scored window may have) as the
    manifest's ``condition`` list; an infinite upper bound is left out."""
    out: list[dict[str, Any]] = []
    for f, lo, hi in condition:
        entry: dict[str, Any] = {"channel": f.channel, "stat": f.stat, "min": lo}
        if hi != float("inf"):
            entry["max"] = hi
        out.append(entry)
    return out


def write_bundle(
    out: Path,
    *,
    name: str,
    version: str,
    description: str,
    onnx_bytes: bytes,
    features: Sequence[FeatureSpec],
    window_s: float,
    golden_inputs: npt.NDArray[np.float32],
    golden_outputs: npt.NDArray[np.float32],
    threshold: float,
    extra: dict[str, Any] | None = None,
    golden_atol: float = 1e-4,
    golden_rtol: float = 1e-4,
    golden_sequence: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None,
) -> Path:
    """Write ``model.onnx``, ``golden.npz`` and ``manifest.json`` into ``out``.
    ``golden_sequence`` (a bundle with a ``baseline`` stage): ``sequence_inputs`` and
    ``sequence_outputs`` of ``golden.npz``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onnx_bytes)
    arrays: dict[str, npt.NDArray[np.float32]] = {
        "inputs": np.asarray(golden_inputs, np.float32),
        "outputs": np.asarray(golden_outputs, np.float32),
    }
    if golden_sequence is not None:
        arrays["sequence_inputs"] = np.asarray(golden_sequence[0], np.float32)
        arrays["sequence_outputs"] = np.asarray(golden_sequence[1], np.float32)
    np.savez(out / "golden.npz", **arrays)  # type: ignore[arg-type]
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "onnx": "model.onnx",
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "input": "features",
        "output": "score",
        "window_s": window_s,
        "features": features_to_manifest(features),
        "threshold": threshold,
        "golden": "golden.npz",
        "golden_atol": golden_atol,
        "golden_rtol": golden_rtol,
        **(extra or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out
