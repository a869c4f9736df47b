"""TensorRT backend: build from the bundle's ONNX, cache the engine, run with ``execute_async_v3``.

Uses only TensorRT 10 Python API that later releases keep: named I/O tensors
(``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``), ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, ``build_serialized_network``,
``create_optimization_profile``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`` and the
timing cache (``create_timing_cache`` / ``set_timing_cache`` / ``serialize``). FP16 is the one
weak-typing feature used (``BuilderFlag.FP16`` after ``platform_has_fast_fp16``); TensorRT 11
removed both, and this module then builds FP32 (see docs/engines.md).

``import tensorrt`` and pycuda (through :mod:`appliance.infer.cuda`) happen lazily inside the
functions, so the package imports on a laptop.

Threading: ``build()`` may run in a background thread; ``start``/``infer``/``close`` run in the
inference worker thread. The CUDA primary context is pushed around each of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ModelError
from appliance.infer import cuda
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.cache import CacheKey, EngineCache, atomic_write

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/lib/appliance/engines"


def trt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here ("tensorrt not installed", "no CUDA device"), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed"
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError & co.
        return f"tensorrt does not import: {err}"
    return cuda.unavailable_reason()


class TrtEngine(Engine):
    """A TensorRT engine for one model bundle, built once per key and cached on disk.

    ``max_batch`` is the profile's max (and the I/O buffers' size); ``opt_batch`` the profile's
    opt shape (default ``max_batch``); min is 1. ``precision`` is the config's ``"auto"`` (FP16
    when the GPU has fast FP16 and the manifest says ``"fp16": true``), ``"fp32"`` or ``"fp16"``
    (requires the manifest's consent). After ``key()`` the chosen precision is in
    ``self.precision``; after ``start()`` ``self.status`` is "cached" or "built".
    """

    backend = "tensorrt"

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        max_batch: int = 4096,
        opt_batch: int | None = None,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        precision: str = "auto",
        workspace_mb: int = 1024,
        device: int = 0,
    ) -> None:
        super().__init__(bundle, max_batch=max_batch)
        if precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision must be auto/fp32/fp16, got {precision!r}")
        self.opt_batch = min(opt_batch or max_batch, max_batch)
        self.requested_precision = precision
        self.workspace_mb = workspace_mb
        self.device = device
        self.cache = EngineCache(cache_dir)
        self.precision = ""  # "fp32" | "fp16" once key() ran
        self.status = ""  # "cached" | "built" after start()
        self._key: CacheKey | None = None
        self._ctx: cuda.CudaContext | None = None
        self._bufs: cuda.IoBuffers | None = None
        self._engine: Any = None
        self._context: Any = None
        self._built: Any = None  # the engine build() produced, for start() to reuse
        self._runtime: Any = None

    # -- seams for the serving chain --------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        return trt_unavailable_reason()

    def profile_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) input shapes of the optimisation profile."""
        f = self.bundle.n_features
        return (1, f), (self.opt_batch, f), (self.max_batch, f)

    def key(self) -> CacheKey:
        """The cache key for this bundle on this GPU with this TensorRT (decides precision)."""
        if self._key is not None:
            return self._key
        import tensorrt as trt

        gpu = cuda.gpu_info(self.device)
        self.precision = self._choose_precision(trt)
        lo, opt, hi = self.profile_shapes()
        self._key = CacheKey(
            model=self.bundle.name,
            onnx_sha256=self.bundle.onnx_sha256,
            trt_version=str(trt.__version__),
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            precision=self.precision,
            profile=((self.bundle.input_name, lo, opt, hi),),
            builder_flags=(f"workspace_mb={self.workspace_mb}",),
        )
        return self._key

    def _choose_precision(self, trt: Any) -> str:
        manifest_ok = self.bundle.allow_fp16
        has_flag = hasattr(trt.BuilderFlag, "FP16")
        if self.requested_precision == "fp32":
            return "fp32"
        if self.requested_precision == "fp16":
            if not manifest_ok:
                raise ModelError(
                    f"engine.precision = 'fp16' but model {self.bundle.name}'s manifest "
                    f'{self.bundle.directory / "manifest.json"} does not set "fp16": true'
                )
            if not has_flag:
                raise ModelError(
                    f"engine.precision = 'fp16': TensorRT {trt.__version__} has no FP16 "
                    "builder flag (strongly typed networks only)"
                )
            return "fp16"
        if not (manifest_ok and has_flag):
            return "fp32"
        builder = trt.Builder(_logger(trt))
        return "fp16" if getattr(builder, "platform_has_fast_fp16", False) else "fp32"

    def needs_build(self) -> bool:
        """True when no valid engine for this key is cached. False when TensorRT is unavailable
        or the key cannot be formed (a refused precision): ``start()`` then raises the reason."""
        if self.unavailable_reason() is not None:
            return False
        try:
            with self._context_current():
                return not self.cache.is_cached(self.key())
        except ModelError:
            return False

    def build(self) -> None:
        """Build (or find) the engine for this key; safe across threads and processes."""
        with self._context_current():
            self._built = self._load_or_build()

    # -- lifecycle -------------------------------------------------------------------------
    def _context_current(self) -> cuda.CudaContext:
        if self._ctx is None:
            self._ctx = cuda.CudaContext(self.device)
        return self._ctx

    def _load_or_build(self) -> Any:
        import tensorrt as trt

        key = self.key()
        if self._runtime is None:  # kept: TensorRT wants the runtime to outlive its engines
            self._runtime = trt.Runtime(_logger(trt))
        runtime = self._runtime

        def deserialize(data: bytes) -> Any:
            return runtime.deserialize_cuda_engine(data)

        engine, self.status = self.cache.get_or_build(
            key,
            lambda: self._build_serialized(trt, key),
            deserialize,
            on_build=lambda: log.info(
                "tensorrt: building %s (%s, profile %s); this can take minutes",
                key.stem,
                key.precision,
                self.profile_shapes(),
            ),
        )
        return engine

    def _build_serialized(self, trt: Any, key: CacheKey) -> bytes:
        logger = _logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
        parser = trt.OnnxParser(network, logger)
        onnx = self.bundle.onnx_path.read_bytes()
        if not parser.parse(onnx):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"tensorrt cannot parse {self.bundle.onnx_path}: {errors}")
        names_in = [network.get_input(i).name for i in range(network.num_inputs)]
        names_out = [network.get_output(i).name for i in range(network.num_outputs)]
        if names_in != [self.bundle.input_name] or self.bundle.output_name not in names_out:
            raise ModelError(
                f"{self.bundle.onnx_path}: graph I/O {names_in}→{names_out} does not match the "
                f"manifest's {self.bundle.input_name}→{self.bundle.output_name}"
            )
        for tensor in [network.get_output(i) for i in range(network.num_outputs)]:
            if tensor.name != self.bundle.output_name:
                network.unmark_output(tensor)  # not served (e.g. a classifier's class_probs)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if key.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in key.profile:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing_path = self.cache.timing_cache_path(key)
        try:
            blob = timing_path.read_bytes()
        except OSError:
            blob = b""
        timing = config.create_timing_cache(blob)
        if not config.set_timing_cache(timing, False):
            log.info("tensorrt: timing cache %s does not match; starting afresh", timing_path)
            config.set_timing_cache(config.create_timing_cache(b""), False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(
                f"tensorrt failed to build an engine for {self.bundle.onnx_path} "
                f"({key.precision}, profile {self.profile_shapes()})"
            )
        try:
            timing_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        except OSError as err:  # the timing cache only speeds up later builds
            log.warning("tensorrt: cannot save timing cache %s: %s", timing_path, err)
        return bytes(memoryview(plan))

    def _start_impl(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise ModelError(f"tensorrt backend unavailable: {reason}")
        import tensorrt as trt

        with self._context_current():
            self._engine = self._built if self._built is not None else self._load_or_build()
            self._built = None
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            b = self.bundle
            if inputs != [b.input_name] or b.output_name not in outputs:
                raise ModelError(
                    f"tensorrt engine {self.cache.engine_path(self.key())}: I/O {inputs}→"
                    f"{outputs} does not match the manifest's {b.input_name}→{b.output_name}"
                )
            self._context = self._engine.create_execution_context()
            self._bufs = cuda.IoBuffers(self.max_batch, b.n_features, 1)
            self._context.set_tensor_address(b.input_name, self._bufs.in_ptr)
            self._context.set_tensor_address(b.output_name, self._bufs.out_ptr)
        self.detail = f"{self.key().stem} {self.precision} ({self.status})"

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        assert self._bufs is not None and self._ctx is not None
        n = batch.shape[0]
        with self._ctx:
            if not self._context.set_input_shape(self.bundle.input_name, (n, batch.shape[1])):
                raise ModelError(f"tensorrt: batch of {n} is outside the engine's profile")
            self._bufs.upload(batch)
            if not self._context.execute_async_v3(self._bufs.stream_handle):
                raise ModelError(f"tensorrt: execute_async_v3 failed for a batch of {n}")
            return self._bufs.download(n)

    def _close_impl(self) -> None:
        if self._ctx is not None:
            with self._ctx:
                if self._bufs is not None:
                    self._bufs.free()
                self._context = None
                self._engine = None
            self._bufs = None

    def release(self) -> None:
        """Close and drop the CUDA context reference (the engine can no longer be started)."""
        self.close()
        if self._ctx is not None:
            self._ctx.release()
            self._ctx = None


def _parser_error(err: Any) -> str:
    """An ``IParserError`` as text (its ``desc()``), whatever the release gives back."""
    desc = getattr(err, "desc", None)
    return str(desc() if callable(desc) else err)


_LOGGERS: dict[int, Any] = {}


def _logger(trt: Any) -> Any:
    """One TensorRT logger per module object (TensorRT wants it to outlive builders)."""
    lg = _LOGGERS.get(id(trt))
    if lg is None:
        lg = _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return lg
