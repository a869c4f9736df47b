"""TEST DOUBLE of ``pycuda.driver`` (see ../README.md): fake device memory in host numpy arrays.

Device pointers are integers handed out by :func:`mem_alloc`; :func:`device_view` maps a pointer
back to the bytes, which is how the fake TensorRT execution context reads inputs and writes
outputs. Like the real driver, allocating or copying without a current context is an error.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FakeCuda:
    devices: int = int(os.environ.get("FAKE_CUDA_DEVICES", "1"))
    gpu_name: str = os.environ.get("FAKE_CUDA_GPU_NAME", "Fake Orin (test double)")
    compute_capability: tuple[int, int] = tuple(  # type: ignore[assignment]
        int(x) for x in os.environ.get("FAKE_CUDA_CC", "8.7").split(".")
    )


FAKE = FakeCuda()


class LogicError(RuntimeError):
    pass


_local = threading.local()
_memory: dict[int, np.ndarray] = {}
_next_ptr = [0x7F0000000000]
_lock = threading.Lock()


def _stack() -> list[Context]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack  # type: ignore[no-any-return]


def _require_context(what: str) -> None:
    if not _stack():
        raise LogicError(
            f"cuda{what} failed: explicit_context_dependent failed: invalid device "
            "context - no currently active context?"
        )


def init() -> None:
    return None


class Context:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.detached = False

    def push(self) -> None:
        if self.detached:
            raise LogicError("context was detached")
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        if not _stack():
            raise LogicError("cuCtxPopCurrent failed: no context")
        _stack().pop()

    def detach(self) -> None:
        self.detached = True


class Device:
    def __init__(self, ordinal: int) -> None:
        if ordinal >= FAKE.devices:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")
        self.ordinal = ordinal

    @staticmethod
    def count() -> int:
        return FAKE.devices

    def name(self) -> str:
        return FAKE.gpu_name

    def compute_capability(self) -> tuple[int, int]:
        return FAKE.compute_capability

    def retain_primary_context(self) -> Context:
        return Context(self)


class DeviceAllocation:
    def __init__(self, nbytes: int) -> None:
        with _lock:
            self.ptr = _next_ptr[0]
            _next_ptr[0] += (nbytes + 0xFFFF) & ~0xFFFF
            _memory[self.ptr] = np.zeros(nbytes, np.uint8)
        self.nbytes = nbytes

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        _memory.pop(self.ptr, None)


def device_view(ptr: int, nbytes: int) -> np.ndarray:
    """The fake device bytes at ``ptr`` (for the fake TensorRT)."""
    for base, mem in _memory.items():
        if base <= ptr and ptr + nbytes <= base + mem.size:
            return mem[ptr - base : ptr - base + nbytes]
    raise LogicError(f"an illegal memory access was encountered (pointer {ptr:#x})")


def live_allocations() -> int:
    return len(_memory)


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("MemAlloc")
    return DeviceAllocation(nbytes)


def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype)


class Stream:
    _handles = [0x5000]

    def __init__(self) -> None:
        _require_context("StreamCreate")
        Stream._handles[0] += 1
        self.handle = Stream._handles[0]

    def synchronize(self) -> None:
        _require_context("StreamSynchronize")


def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream | None = None) -> None:
    _require_context("MemcpyHtoDAsync")
    raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    device_view(int(dest), raw.size)[:] = raw


def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream | None = None) -> None:
    _require_context("MemcpyDtoHAsync")
    out = dest.view(np.uint8).reshape(-1)
    out[:] = device_view(int(src), out.size)
