"""CUDA memory for the TensorRT backend: the ONE module that talks to the CUDA driver (pycuda).

What it holds, for one engine: pinned (page-locked) host buffers and device buffers sized for
the optimisation profile's max batch, one CUDA stream, and asynchronous copies on that stream.
TensorRT itself uses the CUDA runtime, which works in the device's *primary* context; this
module retains that same primary context and pushes it around every call, so the buffers, the
stream and TensorRT's kernels all live in one context whichever thread calls (the serving chain
builds in a background thread and serves from the inference worker thread).

Why pycuda (the ``gpu`` extra) rather than NVIDIA's cuda-python: the dozen calls used here
(``mem_alloc``, ``pagelocked_empty``, ``Stream``, ``memcpy_*_async``) have been stable for a
decade, while cuda-python moved its runtime bindings between releases (``cuda.cudart`` →
``cuda.bindings.runtime``). On JetPack 6 pycuda builds from source against the CUDA 12 toolkit
JetPack installs. Swapping libraries later touches this file only.

``import pycuda`` happens lazily inside the functions, so this module imports on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device the engine is built for (part of the engine cache key)."""

    name: str
    compute_capability: str  # "8.7" on a Jetson Orin


def unavailable_reason() -> str | None:
    """Why no CUDA device can be used from Python here, or ``None``. Cheap; no allocation."""
    try:
        import pycuda.driver as drv
    except ImportError:
        return "pycuda not installed (pip install '.[gpu]')"
    try:
        drv.init()
        if drv.Device.count() < 1:
            return "no CUDA device"
    except Exception as err:  # pycuda raises its own driver errors (no driver, no device)
        return f"no CUDA device ({err})"
    return None


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``."""
    import pycuda.driver as drv

    drv.init()
    dev = drv.Device(device)
    major, minor = dev.compute_capability()
    return GpuInfo(name=str(dev.name()), compute_capability=f"{major}.{minor}")


class CudaContext:
    """The device's primary context, retained once; ``with ctx:`` makes it current."""

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as drv

        drv.init()
        self._ctx: Any = drv.Device(device).retain_primary_context()

    def __enter__(self) -> CudaContext:
        self._ctx.push()
        return self

    def __exit__(self, *exc: object) -> None:
        import pycuda.driver as drv

        drv.Context.pop()

    def release(self) -> None:
        """Drop our reference to the primary context (idempotent)."""
        if self._ctx is not None:
            self._ctx.detach()
            self._ctx = None


class IoBuffers:
    """Pinned host + device buffers for one input and one output, and one stream.

    Sized once for ``max_rows``; a call copies only the first ``n`` rows. Use inside
    ``with CudaContext``.
    """

    def __init__(self, max_rows: int, n_in: int, n_out: int) -> None:
        import pycuda.driver as drv

        self.max_rows = max_rows
        self.host_in: npt.NDArray[np.float32] = drv.pagelocked_empty((max_rows, n_in), np.float32)
        self.host_out: npt.NDArray[np.float32] = drv.pagelocked_empty(
            (max_rows * n_out,), np.float32
        )
        self.dev_in: Any = drv.mem_alloc(self.host_in.nbytes)
        self.dev_out: Any = drv.mem_alloc(self.host_out.nbytes)
        self.stream: Any = drv.Stream()
        self._n_out = n_out

    @property
    def in_ptr(self) -> int:
        return int(self.dev_in)

    @property
    def out_ptr(self) -> int:
        return int(self.dev_out)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def upload(self, batch: npt.NDArray[np.float32]) -> None:
        """Copy ``batch`` [n, F] into the pinned buffer, then asynchronously to the device."""
        import pycuda.driver as drv

        n = batch.shape[0]
        self.host_in[:n] = batch
        drv.memcpy_htod_async(self.dev_in, self.host_in[:n], self.stream)

    def download(self, n: int) -> npt.NDArray[np.float32]:
        """Asynchronously copy ``n`` rows of output back, wait for the stream, return a copy."""
        import pycuda.driver as drv

        k = n * self._n_out
        drv.memcpy_dtoh_async(self.host_out[:k], self.dev_out, self.stream)
        self.stream.synchronize()
        out: npt.NDArray[np.float32] = self.host_out[:k].copy()
        return out

    def free(self) -> None:
        """Free the device buffers (idempotent)."""
        for attr in ("dev_in", "dev_out"):
            mem = getattr(self, attr)
            if mem is not None:
                mem.free()
                setattr(self, attr, None)
