"""Engine selection: TensorRT → onnxruntime with CUDA → onnxruntime on the CPU.

The choice and the reason for it are returned (and logged by the runtime), so a person can see
why a box runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import logging

from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.ort import OrtEngine

log = logging.getLogger(__name__)


def select_engine(
    bundle: ModelBundle, backend: str = "auto", *, threads: int = 1, max_batch: int = 4096
) -> tuple[Engine, str]:
    """Pick an engine for ``bundle``. Returns the (not yet started) engine and the reason."""
    reasons: list[str] = []
    if backend == "auto":
        if importlib.util.find_spec("tensorrt") is None:
            reasons.append("tensorrt not installed")
        else:
            reasons.append("tensorrt backend not implemented yet")
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" in available:
            reasons.append("onnxruntime CUDAExecutionProvider available")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            reasons.append(f"onnxruntime providers {available}: no CUDA")
            providers = ["CPUExecutionProvider"]
    else:
        reasons.append(f"engine.backend = {backend!r}")
        providers = ["CPUExecutionProvider"]
    engine = OrtEngine(bundle, providers=providers, threads=threads, max_batch=max_batch)
    return engine, "; ".join(reasons)
