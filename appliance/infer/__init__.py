"""Inference engines behind one interface (TensorRT → onnxruntime CUDA → onnxruntime CPU)."""

from appliance.infer.base import Engine, EngineStats
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.select import EngineOptions, ServingEngine, select_engine

__all__ = [
    "Engine",
    "EngineOptions",
    "EngineStats",
    "ModelBundle",
    "ServingEngine",
    "load_bundle",
    "select_engine",
]
