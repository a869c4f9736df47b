"""onnxruntime backends: the CPU, the CUDA execution provider, the TensorRT execution provider.

``device`` picks one: ``"cpu"`` (backend ``onnxruntime-cpu``), ``"cuda"``
(``onnxruntime-cuda``, CUDAExecutionProvider) or ``"tensorrt-ep"`` (``onnxruntime-tensorrt``,
TensorrtExecutionProvider with the CUDA EP behind it for any node TensorRT does not take). The
GPU providers come with the ``onnxruntime-gpu`` wheel; ``unavailable_reason()`` reads
``onnxruntime.get_available_providers()``.

The TensorRT EP's engine cache lives in ``<cache_dir>/ort-trt/<model>-<key16>/`` under the same
key discipline as :mod:`appliance.infer.cache`: the folder name changes when the ONNX file, the
TensorRT version, the GPU, the precision or the profile change, so onnxruntime never finds a
stale engine there. A ``.json`` beside the folder records the key fields (``appliance engine
list`` shows it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ModelError
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.cache import CacheKey, atomic_write, ensure_writable_dir

DEVICES = {
    "cpu": ("onnxruntime-cpu", ["CPUExecutionProvider"]),
    "cuda": ("onnxruntime-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    "tensorrt-ep": (
        "onnxruntime-tensorrt",
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    ),
}


class OrtEngine(Engine):
    """An onnxruntime session on ``device``. ``providers`` (legacy) picks the device from a
    provider list when ``device`` is not given."""

    backend = "onnxruntime-cpu"

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device: str | None = None,
        providers: list[str] | None = None,
        threads: int = 1,
        max_batch: int = 4096,
        opt_batch: int | None = None,
        cache_dir: str | Path = "/var/lib/appliance/engines",
        precision: str = "auto",
        workspace_mb: int = 1024,
    ) -> None:
        super().__init__(bundle, max_batch=max_batch)
        if device is None:
            p = providers or ["CPUExecutionProvider"]
            device = (
                "tensorrt-ep"
                if "TensorrtExecutionProvider" in p
                else "cuda"
                if "CUDAExecutionProvider" in p
                else "cpu"
            )
        if device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
        self.device = device
        self.backend, self.providers = DEVICES[device][0], list(DEVICES[device][1])
        self.threads = threads
        self.opt_batch = min(opt_batch or max_batch, max_batch)
        self.cache_dir = Path(cache_dir)
        self.requested_precision = precision
        self.workspace_mb = workspace_mb
        self.precision = "fp32"
        self.provider_options: list[dict[str, str]] = [{} for _ in self.providers]
        self._session: Any = None
        self._run: Any = None  # the session's bound ``run`` (one attribute lookup less per batch)
        self._outputs = [bundle.output_name]
        self._input = bundle.input_name

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime not installed"
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            return f"onnxruntime has no {missing[0]} (providers: {', '.join(available)})"
        return None

    # -- TensorRT EP -----------------------------------------------------------------------
    def trt_ep_key(self) -> CacheKey:
        """Cache key of the TensorRT EP's engine folder (same fields as the TensorRT backend)."""
        from appliance.infer import cuda

        try:
            import tensorrt as trt

            trt_version = str(trt.__version__)
        except ImportError:  # the EP links libnvinfer without the Python package
            import onnxruntime as ort

            trt_version = f"onnxruntime-{ort.__version__}"
        try:
            gpu = cuda.gpu_info()
            gpu_name, cc = gpu.name, gpu.compute_capability
        except Exception:  # no pycuda, or its driver init failed: the EP still works
            gpu_name, cc = "unknown (no pycuda)", "unknown"
        fp16 = self.requested_precision == "fp16" or (
            self.requested_precision == "auto" and self.bundle.allow_fp16
        )
        if fp16 and not self.bundle.allow_fp16:
            raise ModelError(
                f"engine.precision = 'fp16' but model {self.bundle.name}'s manifest does not "
                'set "fp16": true'
            )
        self.precision = "fp16" if fp16 else "fp32"
        f = self.bundle.n_features
        return CacheKey(
            model=self.bundle.name,
            onnx_sha256=self.bundle.onnx_sha256,
            trt_version=trt_version,
            gpu_name=gpu_name,
            compute_capability=cc,
            precision=self.precision,
            profile=((self.bundle.input_name, (1, f), (self.opt_batch, f), (self.max_batch, f)),),
            builder_flags=(f"workspace_mb={self.workspace_mb}", "ort-trt-ep"),
        )

    def trt_ep_options(self) -> dict[str, str]:
        """TensorRT EP provider options; creates and records the keyed cache folder."""
        key = self.trt_ep_key()
        root = ensure_writable_dir(self.cache_dir / "ort-trt")
        folder = ensure_writable_dir(root / key.stem)
        meta = root / f"{key.stem}.json"
        if not meta.exists():
            atomic_write(
                meta,
                json.dumps(
                    {
                        "kind": "ort-trt",
                        "key": key.digest,
                        "fields": key.fields(),
                        "created": time.time(),
                        "build_s": None,
                        "size": None,
                    },
                    indent=1,
                ).encode(),
            )
        name, lo, opt, hi = key.profile[0]

        def shape(s: tuple[int, ...]) -> str:
            return f"{name}:{'x'.join(map(str, s))}"

        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(folder),
            "trt_fp16_enable": "True" if self.precision == "fp16" else "False",
            "trt_max_workspace_size": str(self.workspace_mb << 20),
            "trt_profile_min_shapes": shape(lo),
            "trt_profile_opt_shapes": shape(opt),
            "trt_profile_max_shapes": shape(hi),
        }

    # -- lifecycle -------------------------------------------------------------------------
    def _start_impl(self) -> None:
        import onnxruntime as ort

        reason = self.unavailable_reason()
        if reason is not None:
            raise ModelError(f"{self.backend} backend unavailable: {reason}")
        if self.device == "tensorrt-ep":
            self.provider_options[0] = self.trt_ep_options()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.bundle.onnx_path),
                sess_options=opts,
                providers=self.providers,
                provider_options=self.provider_options,
            )
        except Exception as err:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ModelError(f"onnxruntime cannot load {self.bundle.onnx_path}: {err}") from None
        names_in = [i.name for i in self._session.get_inputs()]
        names_out = [o.name for o in self._session.get_outputs()]
        if self.bundle.input_name not in names_in or self.bundle.output_name not in names_out:
            raise ModelError(
                f"{self.bundle.onnx_path}: graph I/O {names_in}→{names_out} does not match the "
                f"manifest's {self.bundle.input_name}→{self.bundle.output_name}"
            )
        in_use = self._session.get_providers()
        if in_use[0] != self.providers[0]:
            raise ModelError(
                f"{self.backend}: onnxruntime fell back to {in_use} "
                f"({self.providers[0]} failed to initialise)"
            )
        self.detail = ",".join(in_use)
        self._run = self._session.run

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self._run(self._outputs, {self._input: batch})[0]
        return out

    def _close_impl(self) -> None:
        self._session = self._run = None
