"""Inference engines behind one interface (TensorRT → onnxruntime CUDA → onnxruntime CPU)."""

from appliance.infer.base import Engine, EngineStats
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.select import select_engine

__all__ = ["Engine", "EngineStats", "ModelBundle", "load_bundle", "select_engine"]
