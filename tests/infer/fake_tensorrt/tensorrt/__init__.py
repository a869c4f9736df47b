"""TEST DOUBLE of NVIDIA's ``tensorrt`` Python package (see ../README.md).

Implements only what appliance/infer/trt.py calls, with TensorRT 10 names. The "engine" is the
ONNX graph plus the build settings; its execution context runs the graph through onnxruntime on
the fake CUDA device memory of ``pycuda.driver`` (the sibling test double).

Knobs, on :data:`FAKE` or through ``FAKE_TRT_*`` environment variables (child processes):
``build_delay_s``, ``build_fail``, ``corrupt_output``, ``runtime_error``, ``fast_fp16``,
``build_log`` (a file that gets one line per build, across processes). The version string is
``__version__`` (``FAKE_TRT_VERSION``).
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycuda.driver as _cuda

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.3.0")
MAGIC = b"FAKETRT1"


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass
class FakeTrt:
    build_delay_s: float = float(os.environ.get("FAKE_TRT_BUILD_DELAY_S", "0"))
    build_fail: bool = _env_bool("FAKE_TRT_BUILD_FAIL")
    corrupt_output: bool = _env_bool("FAKE_TRT_CORRUPT_OUTPUT")
    runtime_error: bool = _env_bool("FAKE_TRT_RUNTIME_ERROR")
    fast_fp16: bool = os.environ.get("FAKE_TRT_FAST_FP16", "1") != "0"
    build_log: str = os.environ.get("FAKE_TRT_BUILD_LOG", "")
    builds: list[dict[str, Any]] = field(default_factory=list)  # this process's builds


FAKE = FakeTrt()


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity


class BuilderFlag(enum.Enum):
    FP16 = "FP16"


class MemoryPoolType(enum.Enum):
    WORKSPACE = "WORKSPACE"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape


class INetworkDefinition:
    def __init__(self) -> None:
        self.onnx: bytes = b""
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _Tensor:
        return self.outputs[i]

    def unmark_output(self, tensor: _Tensor) -> None:
        self.outputs = [t for t in self.outputs if t.name != tensor.name]


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


class IParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> IParserError:
        return IParserError(self.errors[i])

    def parse(self, model: bytes) -> bool:
        import onnxruntime as ort

        try:
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception as err:
            self.errors.append(f"ModelImporter: {err}")
            return False
        self.network.onnx = bytes(model)
        self.network.inputs = [_Tensor(i.name, _dims(i.shape)) for i in sess.get_inputs()]
        self.network.outputs = [_Tensor(o.name, _dims(o.shape)) for o in sess.get_outputs()]
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
        lo, op, hi = (list(s) for s in (min, opt, max))
        if not all(a <= b <= c for a, b, c in zip(lo, op, hi, strict=True)):
            raise ValueError(f"profile for {name}: need min <= opt <= max, got {lo}/{op}/{hi}")
        self.shapes[name] = [lo, op, hi]


class ITimingCache:
    def __init__(self, blob: bytes) -> None:
        self.entries: list[str] = json.loads(blob) if blob else []

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing: ITimingCache | None = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> ITimingCache:
        return ITimingCache(bytes(blob))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    @property
    def platform_has_fast_fp16(self) -> bool:
        return FAKE.fast_fp16

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition()

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> bytes | None:
        if FAKE.build_delay_s:
            time.sleep(FAKE.build_delay_s)
        if FAKE.build_fail or not config.profiles:
            return None
        dev = _cuda.Device(0)
        header = {
            "trt_version": __version__,
            "gpu_name": dev.name(),
            "compute_capability": list(dev.compute_capability()),
            "fp16": BuilderFlag.FP16 in config.flags,
            "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
            "profile": config.profiles[0].shapes,
            "inputs": [t.name for t in network.inputs],
            "outputs": [t.name for t in network.outputs],
        }
        if config.timing is not None:
            config.timing.entries.append(f"build {len(FAKE.builds)} pid {os.getpid()}")
        FAKE.builds.append(header)
        if FAKE.build_log:
            with open(FAKE.build_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), **header}) + "\n")
        h = json.dumps(header).encode()
        return MAGIC + len(h).to_bytes(4, "little") + h + network.onnx


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx: bytes) -> None:
        self.header = header
        self.onnx = onnx
        self._names = header["inputs"] + header["outputs"]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, i: int) -> str:
        return str(self._names[i])

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.header["inputs"]:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.header["outputs"] else TensorIOMode.NONE

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.header["profile"][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        data = bytes(data)
        if not data.startswith(MAGIC):
            return None  # the real runtime logs "Serialization assertion ... failed" too
        n = int.from_bytes(data[8:12], "little")
        try:
            header = json.loads(data[12 : 12 + n])
        except ValueError:
            return None
        if header["trt_version"] != __version__:
            return None  # "The engine plan file is not compatible with this version"
        if tuple(header["compute_capability"]) != _cuda.Device(0).compute_capability():
            return None  # "The engine plan file is generated on an incompatible device"
        return ICudaEngine(header, data[12 + n :])


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        import onnxruntime as ort

        self.engine = engine
        self.session = ort.InferenceSession(engine.onnx, providers=["CPUExecutionProvider"])
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        lo, _, hi = self.engine.header["profile"][name]
        shape = tuple(shape)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False  # the real API logs an error and returns False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if FAKE.runtime_error:
            raise RuntimeError("CUDA error 700: an illegal memory access was encountered")
        (name_in,) = self.engine.header["inputs"]
        (name_out,) = self.engine.header["outputs"]
        shape = self.shapes[name_in]
        nbytes = int(np.prod(shape)) * 4
        x = _cuda.device_view(self.addresses[name_in], nbytes).view(np.float32).reshape(shape)
        if self.engine.header["fp16"]:
            x = x.astype(np.float16).astype(np.float32)
        (y,) = self.session.run([name_out], {name_in: x})
        y = np.asarray(y, np.float32).reshape(-1)
        if self.engine.header["fp16"]:
            y = y.astype(np.float16).astype(np.float32)
        if FAKE.corrupt_output:
            y = y + 1.0
        _cuda.device_view(self.addresses[name_out], y.nbytes)[:] = y.view(np.uint8)
        self.executions += 1
        return True
