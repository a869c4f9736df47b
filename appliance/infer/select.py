"""The serving chain: TensorRT → onnxruntime CUDA → onnxruntime CPU, with fallback and swap.

:class:`ServingEngine` owns every backend of the chain and answers the batcher's ``infer()``
calls with whichever backend currently serves:

- ``engine.backend = "auto"`` tries the backends in :data:`AUTO_ORDER`. A backend that is
  missing (its factory raises :class:`BackendUnavailable` or ``ImportError``, or
  ``unavailable_reason()`` names a reason), fails to build or load, fails the golden parity
  check, or raises at run time is dropped for the next one; the batch in hand is re-run there,
  so no window is lost or scored twice.
- Serving while building: a better backend that ``needs_build()`` (a TensorRT engine not in the
  cache yet) is built, started and parity-checked in a background thread while the next backend
  that works serves; the inference worker swaps it in between two batches. The replaced backend
  stays loaded (``standby``): it is the first fallback should the new one fail at run time.
- A forced backend (any other ``engine.backend``) has no fallback: absent is a
  :class:`~appliance.errors.ConfigError` at start, failing to build/load/pass parity a
  :class:`~appliance.errors.ModelError`, both naming the backend and the reason.

Every step is logged once with its reason and kept in :meth:`ServingEngine.stats` (``chain``).

Backends plug in by name through :data:`FACTORIES` (a factory builds a not-yet-started
:class:`~appliance.infer.base.Engine`; construction does no I/O).

Threading: ``start``, ``infer`` and ``close`` run in the batcher's single inference worker
thread; a background build runs in its own thread and hands a started engine over under a
lock; ``stats`` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.config import Config
from appliance.errors import ConfigError, ModelError
from appliance.infer.base import LATENCY_BUCKETS_MS, Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.ort import OrtEngine

log = logging.getLogger(__name__)

#: Preference order of ``engine.backend = "auto"``.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")

#: Slot states reported in ``stats()["chain"]``.
SERVING, STANDBY, BUILDING, FAILED, ABSENT = "serving", "standby", "building", "failed", "absent"


class BackendUnavailable(Exception):
    """Raised by a backend factory when the backend cannot run on this host (the reason)."""


@dataclass(frozen=True)
class EngineOptions:
    """What a backend factory gets besides the bundle: the config's ``[engine]`` keys and the
    batch profile (``max_batch``: the largest batch a backend must take, at least the golden
    set; ``opt_batch``: the batch size TensorRT optimises for, ``batch.max_batch``)."""

    threads: int = 1
    max_batch: int = 4096
    opt_batch: int | None = None
    cache_dir: str = "/var/lib/appliance/engines"
    precision: str = "auto"
    workspace_mb: int = 1024

    @classmethod
    def from_config(cls, cfg: Config, bundle: ModelBundle) -> EngineOptions:
        """The options ``appliance run``, ``selftest`` and ``engine build`` all use."""
        return cls(
            threads=cfg.engine.threads,
            max_batch=max(cfg.batch.max_batch, len(bundle.golden_inputs)),
            opt_batch=cfg.batch.max_batch,
            cache_dir=cfg.engine.cache_dir,
            precision=cfg.engine.precision,
            workspace_mb=cfg.engine.workspace_mb,
        )

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "opt_batch": self.opt_batch,
            "cache_dir": self.cache_dir,
            "precision": self.precision,
            "workspace_mb": self.workspace_mb,
        }


BackendFactory = Callable[[ModelBundle, EngineOptions], Engine]


def _tensorrt(bundle: ModelBundle, opts: EngineOptions) -> Engine:
    from appliance.infer.trt import TrtEngine

    return TrtEngine(bundle, **opts.engine_kwargs())


def _onnxruntime(device: str) -> BackendFactory:
    def factory(bundle: ModelBundle, opts: EngineOptions) -> Engine:
        return OrtEngine(bundle, device=device, threads=opts.threads, **opts.engine_kwargs())

    return factory


#: Backend name → factory. Tests add doubles here (``monkeypatch.setitem``).
#: ``onnxruntime-tensorrt`` (onnxruntime's TensorRT execution provider) is not in
#: :data:`AUTO_ORDER`: it compiles while its session is created, which would hold up serving;
#: it can be forced.
FACTORIES: dict[str, BackendFactory] = {
    "tensorrt": _tensorrt,
    "onnxruntime-tensorrt": _onnxruntime("tensorrt-ep"),
    "onnxruntime-cuda": _onnxruntime("cuda"),
    "onnxruntime-cpu": _onnxruntime("cpu"),
}


def _reason(err: BaseException) -> str:
    return str(err) or type(err).__name__


@dataclass
class _Slot:
    name: str
    rank: int
    engine: Engine | None = None
    state: str = STANDBY
    reason: str = ""
    started: bool = False


class ServingEngine:
    """The backends of one model, in preference order, and the one that serves now.

    Construction does no I/O (no factory is called); :meth:`start` creates and starts the
    backends.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        backend: str = "auto",
        options: EngineOptions | None = None,
        *,
        factories: Mapping[str, BackendFactory] | None = None,
        order: Sequence[str] = AUTO_ORDER,
    ) -> None:
        self.bundle = bundle
        self.requested = backend
        self.options = options or EngineOptions()
        self._factories = FACTORIES if factories is None else factories
        names = tuple(order) if backend == "auto" else (backend,)
        for name in names:
            if name not in self._factories:
                raise ConfigError(
                    f"engine.backend: unknown backend {name!r} (known: "
                    f"{', '.join(['auto', *self._factories])})"
                )
        self.forced = backend != "auto"
        self._slots = [_Slot(name, i) for i, name in enumerate(names)]
        self._current: _Slot | None = None
        self._lock = threading.Lock()
        self._ready: list[_Slot] = []  # built in the background, waiting to be swapped in
        self._build_thread: threading.Thread | None = None
        self._closing = False
        self.swaps = 0
        self.fallbacks = 0

    # -- what serves ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the serving backend (``""`` before start)."""
        return self._current.name if self._current else ""

    @property
    def started(self) -> bool:
        """A backend has loaded, passed its parity check and serves."""
        e = self.engine
        return e is not None and e.started

    @property
    def n_features(self) -> int:
        return self.bundle.n_features

    @property
    def engine(self) -> Engine | None:
        return self._current.engine if self._current else None

    @property
    def detail(self) -> str:
        e = self.engine
        return e.detail if e is not None else ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Create the backends, start the best one that works, and build better ones in the
        background. Raises ConfigError/ModelError when nothing can serve (or the forced backend
        cannot)."""
        if self._current is not None:
            return
        to_build: list[_Slot] = []
        for slot in self._slots:
            if not self._create(slot):
                continue
            if self._current is not None:
                self._set(slot, STANDBY, "")
                continue
            assert slot.engine is not None
            try:
                needs_build = slot.engine.needs_build()
            except Exception as err:
                self._fail(slot, f"cannot tell whether it needs a build: {_reason(err)}")
                continue
            if needs_build and not self.forced:
                self._set(slot, BUILDING, "engine not built yet; building in the background")
                to_build.append(slot)
                continue
            if self._start_slot(slot, build=needs_build):
                self._serve(slot)
        if self._current is None and to_build:
            # nothing else serves: build in the foreground rather than not serving at all
            for slot in to_build:
                if self._start_slot(slot, build=True):
                    self._serve(slot)
                    break
            to_build = [s for s in to_build if s.state == BUILDING]
            for slot in to_build:
                self._set(slot, STANDBY, "")
            to_build = []
        if self._current is None:
            self._raise_nothing_serves()
        if to_build:
            self._build_thread = threading.Thread(
                target=self._build_in_background, args=(to_build,), name="engine-build", daemon=True
            )
            self._build_thread.start()

    def _raise_nothing_serves(self) -> None:
        if self.forced:
            slot = self._slots[0]
            msg = f"engine.backend = {slot.name!r}: {slot.reason}"
            if slot.state == ABSENT:
                raise ConfigError(f"{msg} (forced backend is not available on this host)")
            raise ModelError(msg)
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in self._slots)
        raise ModelError(f"model {self.bundle.name}: no inference backend can serve ({reasons})")

    def _create(self, slot: _Slot) -> bool:
        """Build the slot's engine object and ask whether it can run here; False if absent."""
        try:
            slot.engine = self._factories[slot.name](self.bundle, self.options)
            why = slot.engine.unavailable_reason()
        except (BackendUnavailable, ImportError) as err:
            why = _reason(err)
        except Exception as err:
            self._fail(slot, f"cannot be set up: {_reason(err)}")
            return False
        if why is not None:
            slot.engine = None
            self._set(slot, ABSENT, why)
            return False
        return True

    def _start_slot(self, slot: _Slot, *, build: bool) -> bool:
        """Build (when asked), load and parity-check one backend; False (slot failed) if not."""
        assert slot.engine is not None
        try:
            if build:
                slot.engine.build()
            slot.engine.start()
        except Exception as err:
            with self._lock:
                self._fail(slot, _reason(err))
            return False
        slot.started = True
        return True

    def _serve(self, slot: _Slot) -> None:
        self._current = slot
        self._set(slot, SERVING, "")

    def _set(self, slot: _Slot, state: str, reason: str) -> None:
        slot.state, slot.reason = state, reason
        if state == ABSENT:
            log.info("inference backend %s: absent: %s", slot.name, reason)
        elif state == BUILDING:
            log.info("inference backend %s: %s", slot.name, reason)
        elif state == SERVING:
            detail = slot.engine.detail if slot.engine is not None else ""
            log.info("inference backend %s: serving%s", slot.name, f" ({detail})" if detail else "")

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Drop a backend for good (logged once, here); close it if it was loaded."""
        slot.state, slot.reason = FAILED, reason
        log.error("inference backend %s failed: %s", slot.name, reason)
        if slot.engine is not None:
            try:
                slot.engine.close()
            except Exception as err:  # closing a broken backend must not hide why it broke
                log.debug("closing %s: %s", slot.name, err)
        slot.started = False

    def _build_in_background(self, slots: list[_Slot]) -> None:
        for slot in slots:
            if self._closing:
                return
            if not self._start_slot(slot, build=True):
                continue
            with self._lock:
                if self._closing:
                    assert slot.engine is not None
                    slot.engine.close()
                    return
                slot.state, slot.reason = STANDBY, "built; swapping in before the next batch"
                self._ready.append(slot)
            log.info("inference backend %s: built and parity-checked", slot.name)

    def wait_built(self, timeout_s: float | None = None) -> bool:
        """Wait for the background build (tests, tools); True when none is running."""
        t = self._build_thread
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    def close(self) -> None:
        """Close every loaded backend; idempotent. A background build still running finishes
        on its own (its thread is a daemon) and closes what it built."""
        with self._lock:
            self._closing = True
            slots = [s for s in self._slots if s.started]
            self._ready.clear()
        for slot in slots:
            assert slot.engine is not None
            slot.engine.close()
            slot.started = False

    # -- serving ----------------------------------------------------------------------------
    def _maybe_swap(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        cur = self._current
        for slot in sorted(ready, key=lambda s: s.rank):
            if slot.state != STANDBY:
                continue
            if cur is not None and slot.rank < cur.rank and cur.state == SERVING:
                self._set(cur, STANDBY, f"replaced by {slot.name}")
                log.info("inference backend %s: swapped in for %s", slot.name, cur.name)
                self.swaps += 1
                cur = slot
                self._serve(slot)
            else:
                slot.reason = ""

    def infer(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], str]:
        """Score ``batch`` on the serving backend; returns the scores and the backend's name.

        A backend that raises is dropped and the same batch re-run on the next one. Raises
        ModelError when no backend is left (the batch is then lost, counted by the caller)."""
        if self._ready:
            self._maybe_swap()
        while True:
            slot = self._current
            if slot is None or slot.engine is None:
                raise RuntimeError("serving engine used before start()")
            try:
                return slot.engine.infer(batch), slot.name
            except ValueError:
                raise  # the batch itself is malformed (Engine.infer validates): not the backend
            except Exception as err:
                with self._lock:
                    self._fail(slot, f"raised at run time: {_reason(err)}")
                self.fallbacks += 1
                self._current = None
                self._fall_back()

    def _fall_back(self) -> None:
        """Serve on the best backend that is neither failed, absent nor still building."""
        for slot in self._slots:
            if slot.state != STANDBY:
                continue
            if slot.engine is None and not self._create(slot):
                continue
            if slot.started or self._start_slot(slot, build=False):
                log.warning("inference backend %s takes over (re-running the batch)", slot.name)
                self._serve(slot)
                return
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in self._slots)
        raise ModelError(f"model {self.bundle.name}: no inference backend left ({reasons})")

    # -- observability ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            chain = [{"backend": s.name, "state": s.state, "reason": s.reason} for s in self._slots]
        engines = [s.engine for s in self._slots if s.engine is not None]
        calls = sum(e.stats.calls for e in engines)
        total_ms = sum(e.stats.total_ms for e in engines)
        per_backend = [
            {
                "backend": e.backend,
                "calls": e.stats.calls,
                "rows": e.stats.rows,
                "errors": e.stats.errors,
                "total_ms": e.stats.total_ms,
                "last_ms": e.stats.last_ms,
                "max_batch_seen": e.stats.max_batch_seen,
                "latency_ms_histogram": {
                    "le": list(LATENCY_BUCKETS_MS),
                    "counts": list(e.stats.latency_counts),
                },
            }
            for e in engines
        ]
        return {
            "backend": self.backend,
            "requested": self.requested,
            "detail": self.detail,
            "chain": chain,
            "swaps": self.swaps,
            "fallbacks": self.fallbacks,
            "calls": calls,
            "rows": sum(e.stats.rows for e in engines),
            "errors": sum(e.stats.errors for e in engines),
            "mean_ms": total_ms / calls if calls else 0.0,
            "backends": per_backend,
        }

    def summary(self) -> str:
        """One line for the start-up log: what serves and why the better ones do not."""
        parts = []
        for s in self._slots:
            parts.append(f"{s.name}: {s.state}" + (f" ({s.reason})" if s.reason else ""))
        return "; ".join(parts)


def select_engine(
    bundle: ModelBundle, backend: str = "auto", *, threads: int = 1, max_batch: int = 4096
) -> tuple[Engine, str]:
    """The first backend of the chain that is present (not started, nothing built), and why.

    For tools and tests that want one bare engine; the appliance serves through
    :class:`ServingEngine`, which also falls back on failures."""
    opts = EngineOptions(threads=threads, max_batch=max_batch)
    names = AUTO_ORDER if backend == "auto" else (backend,)
    reasons: list[str] = []
    for name in names:
        factory = FACTORIES.get(name)
        if factory is None:
            raise ConfigError(f"engine.backend: unknown backend {name!r}")
        try:
            engine = factory(bundle, opts)
            why = engine.unavailable_reason()
        except (BackendUnavailable, ImportError) as err:
            why = _reason(err)
        if why is None:
            reasons.append(f"{name}: present")
            return engine, "; ".join(reasons)
        reasons.append(f"{name}: {why}")
    raise ConfigError(f"engine.backend = {backend!r}: no backend present ({'; '.join(reasons)})")
