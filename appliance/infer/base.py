"""The engine interface (after Polygraphy's runners).

``infer()`` is public: it validates the batch, times and counts the call, and checks the
output. A backend writes only ``_start_impl``, ``_infer_impl`` and ``_close_impl``. Heavy imports
(tensorrt, pycuda, onnxruntime) happen inside the backend modules, so importing this package on
a laptop without a GPU is cheap.

Threading: ``start``, ``infer`` and ``close`` are called from the batcher's single inference
worker thread (or from a test's main thread); an engine is never used from two threads at once.
"""

from __future__ import annotations

import bisect
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ModelError
from appliance.infer.bundle import ModelBundle
from appliance.infer.drift import sequence_scores

_F32 = np.dtype(np.float32)
_now = time.perf_counter

#: Upper bounds (ms) of the inference latency histogram (:attr:`EngineStats.latency_counts`).
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


@dataclass
class EngineStats:
    """Counters of successful ``infer()`` calls (``errors``: failed ones). ``latency_counts``
    has one entry per bound of :data:`LATENCY_BUCKETS_MS` plus one above the last (per bucket,
    not cumulative); ``total_ms`` is their sum."""

    calls: int = 0
    rows: int = 0
    errors: int = 0
    total_ms: float = 0.0
    last_ms: float = 0.0
    max_batch_seen: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))


class Engine(ABC):
    """One loaded model ready to score feature batches ``[N, F] float32 → [N] float32``."""

    backend = "abstract"

    def __init__(self, bundle: ModelBundle, *, max_batch: int = 4096) -> None:
        self.bundle = bundle
        self.max_batch = max_batch
        self.stats = EngineStats()
        self.detail = ""  # e.g. the execution providers in use
        self._started = False

    @property
    def started(self) -> bool:
        """True between a successful ``start()`` and ``close()`` (the local API's ``/ready``)."""
        return self._started

    # -- lifecycle seams used by the serving chain (appliance/infer/select.py) ---------------
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this host (module missing, no GPU), or ``None``.

        Cheap: no model load, no build. The serving chain skips a backend that reports a reason.
        """
        return None

    def needs_build(self) -> bool:
        """True when ``start()`` would first have to compile the model (e.g. a TensorRT engine
        not in the cache yet): the serving chain then builds it in the background while an
        earlier-ready backend serves."""
        return False

    def build(self) -> None:
        """Compile and cache whatever ``start()`` needs (may take minutes; any thread).
        Backends with nothing to build keep this no-op."""
        return None

    def start(self) -> None:
        """Load the model, then refuse to serve unless it reproduces the golden vectors."""
        if self._started:
            return
        self._start_impl()
        self._started = True
        self.check_parity()

    def check_parity(self) -> float:
        """Check the golden vectors; return the max abs error, raise ModelError on a miss.

        Per element of the output: pass when ``|got - want| <= atol + rtol * |want|`` with the
        manifest's ``golden_atol`` and ``golden_rtol`` (rtol 0 by default: an absolute check).
        A NaN anywhere fails. The error names the backend, the model, the worst element (the one
        furthest beyond its bound) and both tolerances.
        """
        b = self.bundle
        err = self._check_golden(self.infer(b.golden_inputs), b.golden_outputs, "")
        if b.drift is not None and b.sequence_inputs is not None:
            # the stateful stage too: one machine's rows through a fresh stage, then this engine
            got_seq = sequence_scores(b.drift, b.sequence_inputs, self.infer, self.max_batch)
            want_seq = np.asarray(b.sequence_outputs, np.float64)
            if not np.array_equal(np.isnan(got_seq), np.isnan(want_seq)):
                raise ModelError(
                    f"{self.backend}: model {b.name} {b.version} fails its golden sequence "
                    "check (manifest key baseline): the stage emitted other rows than "
                    "sequence_outputs; refusing to serve"
                )
            ok = ~np.isnan(want_seq)
            err = max(err, self._check_golden(got_seq[ok], want_seq[ok], " sequence"))
        return err

    def _check_golden(
        self,
        got: npt.NDArray[Any],
        want: npt.NDArray[Any],
        what: str,
    ) -> float:
        b = self.bundle
        if not got.size:
            return 0.0
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bound = b.golden_atol + b.golden_rtol * np.abs(want.astype(np.float64))
        excess = np.where(np.isnan(diff), np.inf, diff - bound)
        worst = int(np.argmax(excess))
        if excess[worst] > 0:
            raise ModelError(
                f"{self.backend}: model {b.name} {b.version} fails its golden-vector{what} "
                f"parity check on output {b.output_name!r}: element {worst} = "
                f"{float(got[worst])!r}, golden {float(want[worst])!r}, |error| "
                f"{float(diff[worst])!r} > "
                f"atol {b.golden_atol:g} + rtol {b.golden_rtol:g} × |golden| "
                f"= {float(bound[worst])!r}; refusing to serve"
            )
        return float(np.max(diff))

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Score ``batch`` ``[N, F]`` float32 → ``[N]`` float32: validated, timed, counted.

        Runs once per batch on the hot path, so the common case takes one combined check (the
        precise error is worked out only when it fails): ~1 µs on top of the backend's call.
        """
        if not self._started:
            raise RuntimeError(f"{self.backend} engine used before start()")
        shape = batch.shape
        if (
            batch.dtype != _F32
            or len(shape) != 2
            or shape[1] != self.bundle.n_features
            or not 0 < shape[0] <= self.max_batch
        ):
            self._reject(batch)
        n = shape[0]
        t0 = _now()
        try:
            out = self._infer_impl(
                batch if batch.flags.c_contiguous else np.ascontiguousarray(batch)
            )
            if out.dtype != _F32 or out.shape != (n,):
                out = np.asarray(out, dtype=np.float32).reshape(-1)
                if out.shape != (n,):
                    raise ModelError(f"{self.backend}: output shape {out.shape}, expected ({n},)")
        except Exception:
            self.stats.errors += 1
            raise
        ms = (_now() - t0) * 1e3
        s = self.stats
        s.calls += 1
        s.rows += n
        s.total_ms += ms
        s.last_ms = ms
        s.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        if n > s.max_batch_seen:
            s.max_batch_seen = n
        return out

    def _reject(self, batch: npt.NDArray[np.float32]) -> None:
        """Raise the ValueError that says what is wrong with ``batch``."""
        if batch.dtype != _F32 or batch.ndim != 2:
            raise ValueError(f"batch must be 2-D float32, got {batch.ndim}-D {batch.dtype}")
        n, f = batch.shape
        if f != self.bundle.n_features:
            raise ValueError(f"batch has {f} features, model expects {self.bundle.n_features}")
        raise ValueError(f"batch size {n} outside 1..{self.max_batch}")

    def close(self) -> None:
        """Release the model; idempotent."""
        if self._started:
            self._started = False
            self._close_impl()

    @abstractmethod
    def _start_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

    def _close_impl(self) -> None:
        return None
