"""The serving chain (appliance/infer/select.py): fallback with reasons, forced backends, and
serving while a better backend builds in the background.

The real onnxruntime CPU engine serves in every test. TensorRT and CUDA cannot run here, so the
backends that fail in the ways a GPU backend fails are TEST DOUBLES: subclasses of the real
onnxruntime engine (named ``...Double``) whose only change is the failure they inject.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import numpy.typing as npt
import pytest

from appliance.batch import Batcher
from appliance.contracts import FeatureRow, ScoreBatch
from appliance.errors import ConfigError, ModelError
from appliance.infer import EngineOptions, ServingEngine, load_bundle
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.ort import OrtEngine
from appliance.infer.select import FACTORIES, BackendFactory, BackendUnavailable

CPU = ["CPUExecutionProvider"]


class AbsentDouble(OrtEngine):
    """Test double: a backend whose library/GPU is missing on this host."""

    def unavailable_reason(self) -> str | None:
        return "no GPU on this host (test double)"


class WrongParityDouble(OrtEngine):
    """Test double: loads, but computes different numbers (a miscompiled FP16 engine)."""

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return super()._infer_impl(batch) + np.float32(0.5)


class RunTimeErrorDouble(OrtEngine):
    """Test double: passes its parity check, then raises on the ``fail_on``-th serving call
    (a CUDA error in the middle of the night)."""

    fail_on = 2

    def __init__(self, bundle: ModelBundle, **kw: object) -> None:
        super().__init__(bundle, providers=CPU)
        self.serving_calls = 0

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if batch.shape[0] != len(self.bundle.golden_inputs):
            self.serving_calls += 1
            if self.serving_calls >= self.fail_on:
                raise RuntimeError("CUDA error: an illegal memory access (test double)")
        return super()._infer_impl(batch)


class SlowBuildDouble(OrtEngine):
    """Test double: a backend that must be compiled first (a TensorRT engine not in the cache);
    ``build()`` blocks until the test releases it, then succeeds or fails."""

    def __init__(self, bundle: ModelBundle, *, fail: bool = False) -> None:
        super().__init__(bundle, providers=CPU)
        self.release = threading.Event()
        self.fail = fail
        self.built = False
        self.build_thread = ""

    def needs_build(self) -> bool:
        return not self.built

    def build(self) -> None:
        self.build_thread = threading.current_thread().name
        if not self.release.wait(10):
            raise TimeoutError("test never released the build")
        if self.fail:
            raise ModelError("builder ran out of workspace memory (test double)")
        self.built = True


def cpu(bundle: ModelBundle, opts: EngineOptions) -> Engine:
    return OrtEngine(bundle, providers=CPU, max_batch=opts.max_batch)


def double(cls: type[OrtEngine]) -> BackendFactory:
    return lambda bundle, opts: cls(bundle, providers=CPU)


def absent_by_factory(bundle: ModelBundle, opts: EngineOptions) -> Engine:
    raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (test double)")


def serving(factories: dict[str, BackendFactory], backend: str = "auto") -> ServingEngine:
    return ServingEngine(load_bundle("cnc_anomaly"), backend, factories=factories, order=factories)


def chain(eng: ServingEngine) -> list[tuple[str, str]]:
    return [(c["backend"], c["state"]) for c in eng.stats()["chain"]]


def test_auto_skips_an_absent_and_a_parity_failing_backend_and_says_why_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.infer.select")
    eng = serving(
        {
            "gpu": double(AbsentDouble),
            "cuda": absent_by_factory,
            "fp16": double(WrongParityDouble),
            "onnxruntime-cpu": cpu,
        }
    )
    eng.start()
    try:
        assert eng.backend == "onnxruntime-cpu"
        assert chain(eng) == [
            ("gpu", "absent"),
            ("cuda", "absent"),
            ("fp16", "failed"),
            ("onnxruntime-cpu", "serving"),
        ]
        reasons = {c["backend"]: c["reason"] for c in eng.stats()["chain"]}
        assert "no GPU" in reasons["gpu"] and "CUDAExecutionProvider" in reasons["cuda"]
        assert "parity" in reasons["fp16"]
        b = eng.bundle
        scores, backend = eng.infer(b.golden_inputs)
        np.testing.assert_allclose(scores, b.golden_outputs, atol=b.golden_atol)
        assert backend == "onnxruntime-cpu"
    finally:
        eng.close()
        eng.close()
    for what in ("gpu: absent", "cuda: absent", "fp16 failed", "onnxruntime-cpu: serving"):
        assert caplog.text.count(f"inference backend {what}") == 1, what


def test_a_backend_raising_at_run_time_is_dropped_and_the_batch_is_rerun_on_the_next() -> None:
    eng = serving({"gpu": lambda b, o: RunTimeErrorDouble(b), "onnxruntime-cpu": cpu})
    eng.start()
    b = eng.bundle
    try:
        first, by1 = eng.infer(b.golden_inputs[:4])
        second, by2 = eng.infer(b.golden_inputs[4:9])  # the double raises: re-run on the CPU
        third, by3 = eng.infer(b.golden_inputs[9:])
    finally:
        eng.close()
    assert (by1, by2, by3) == ("gpu", "onnxruntime-cpu", "onnxruntime-cpu")
    np.testing.assert_allclose(
        np.concatenate([first, second, third]), b.golden_outputs, atol=b.golden_atol
    )
    st = eng.stats()
    assert st["fallbacks"] == 1 and st["backend"] == "onnxruntime-cpu"
    assert chain(eng) == [("gpu", "failed"), ("onnxruntime-cpu", "serving")]
    assert "illegal memory access" in st["chain"][0]["reason"]


def test_when_every_backend_fails_at_run_time_the_error_names_them_all() -> None:
    class AlwaysFailsDouble(RunTimeErrorDouble):
        fail_on = 1

    eng = serving({"a": lambda b, o: AlwaysFailsDouble(b), "b": lambda b, o: AlwaysFailsDouble(b)})
    eng.start()
    with pytest.raises(ModelError, match="no inference backend left.*a: raised.*b: raised"):
        eng.infer(eng.bundle.golden_inputs[:2])
    eng.close()


def test_no_backend_that_serves_is_an_error_with_every_reason() -> None:
    eng = serving({"gpu": double(AbsentDouble), "fp16": double(WrongParityDouble)})
    with pytest.raises(ModelError, match="no inference backend can serve.*gpu: no GPU.*parity"):
        eng.start()


def test_a_forced_absent_backend_is_a_config_error_and_never_falls_back() -> None:
    eng = serving({"gpu": double(AbsentDouble), "onnxruntime-cpu": cpu}, backend="gpu")
    with pytest.raises(ConfigError, match="engine.backend = 'gpu': no GPU on this host"):
        eng.start()
    assert chain(eng) == [("gpu", "absent")]


def test_a_forced_backend_failing_parity_is_a_model_error_naming_it() -> None:
    eng = serving({"fp16": double(WrongParityDouble), "onnxruntime-cpu": cpu}, backend="fp16")
    with pytest.raises(ModelError, match="engine.backend = 'fp16':.*parity"):
        eng.start()


def test_an_unknown_backend_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'tensorrtt'"):
        ServingEngine(load_bundle("cnc_anomaly"), "tensorrtt")


def test_the_shipped_chain_reports_tensorrt_and_cuda_absent_on_this_cpu_host() -> None:
    eng = ServingEngine(load_bundle("cnc_anomaly"))
    assert set(FACTORIES) == {
        "tensorrt",
        "onnxruntime-tensorrt",
        "onnxruntime-cuda",
        "onnxruntime-cpu",
    }
    eng.start()
    eng.close()
    assert chain(eng) == [
        ("tensorrt", "absent"),
        ("onnxruntime-cuda", "absent"),
        ("onnxruntime-cpu", "serving"),
    ]


def run_through_batcher(
    eng: ServingEngine, builder: SlowBuildDouble, n_rows: int
) -> tuple[list[ScoreBatch], Batcher]:
    """Submit ``n_rows`` windows at ~2 ms intervals; release the build after a third of them.
    Returns what was delivered (after a drain)."""
    out: list[ScoreBatch] = []
    bundle = eng.bundle
    g = bundle.golden_inputs

    async def go() -> Batcher:
        b = Batcher(eng, out.append, max_batch=4, max_delay_ms=1, queue_size=4096)
        await b.start()
        for i in range(n_rows):
            b.submit(FeatureRow(f"m{i}", float(i), g[i % len(g)]))
            if i == n_rows // 3:
                builder.release.set()
            if i > n_rows // 3:
                await asyncio.to_thread(eng.wait_built, 10.0)
            await asyncio.sleep(0.002)
        await b.drain()
        await b.close()
        return b

    return out, asyncio.run(go())


def test_serving_starts_on_the_next_backend_while_the_best_builds_then_swaps_between_batches() -> (
    None
):
    bundle = load_bundle("cnc_anomaly")
    builder = SlowBuildDouble(bundle)
    eng = serving({"trt": lambda b, o: builder, "onnxruntime-cpu": cpu})
    out, batcher = run_through_batcher(eng, builder, 60)
    machines = [m for sb in out for m in sb.machines]
    assert machines == [f"m{i}" for i in range(60)]  # every window scored, exactly once
    assert batcher.dropped == 0 and batcher.errors == 0
    backends = [sb.backend for sb in out]
    first_trt = backends.index("trt")
    assert first_trt > 0 and set(backends[:first_trt]) == {"onnxruntime-cpu"}
    assert set(backends[first_trt:]) == {"trt"}  # later scores all come from the new backend
    g = bundle.golden_outputs
    expected = g[[i % len(g) for i in range(60)]]
    np.testing.assert_allclose(np.concatenate([sb.score for sb in out]), expected, atol=1e-4)
    assert builder.build_thread == "engine-build"  # not the inference worker
    st = eng.stats()
    assert st["swaps"] == 1 and st["backend"] == "trt"
    assert chain(eng) == [("trt", "serving"), ("onnxruntime-cpu", "standby")]


def test_a_failed_background_build_leaves_the_old_backend_serving_with_the_reason() -> None:
    bundle = load_bundle("cnc_anomaly")
    builder = SlowBuildDouble(bundle, fail=True)
    eng = serving({"trt": lambda b, o: builder, "onnxruntime-cpu": cpu})
    out, batcher = run_through_batcher(eng, builder, 30)
    assert [m for sb in out for m in sb.machines] == [f"m{i}" for i in range(30)]
    assert {sb.backend for sb in out} == {"onnxruntime-cpu"}
    st = eng.stats()
    assert st["swaps"] == 0 and st["backend"] == "onnxruntime-cpu"
    assert chain(eng) == [("trt", "failed"), ("onnxruntime-cpu", "serving")]
    assert "out of workspace memory" in st["chain"][0]["reason"]


def test_a_stats_reader_sees_building_while_the_build_runs() -> None:
    bundle = load_bundle("cnc_anomaly")
    builder = SlowBuildDouble(bundle)
    eng = serving({"trt": lambda b, o: builder, "onnxruntime-cpu": cpu})
    eng.start()
    try:
        assert chain(eng) == [("trt", "building"), ("onnxruntime-cpu", "serving")]
        assert "building in the background" in eng.stats()["chain"][0]["reason"]
    finally:
        builder.release.set()
        assert eng.wait_built(10)
        eng.close()


def test_a_forced_backend_that_needs_a_build_is_built_before_serving() -> None:
    bundle = load_bundle("cnc_anomaly")
    builder = SlowBuildDouble(bundle)
    builder.release.set()
    eng = serving({"trt": lambda b, o: builder, "onnxruntime-cpu": cpu}, backend="trt")
    t0 = time.monotonic()
    eng.start()
    assert time.monotonic() - t0 < 10 and builder.built
    assert eng.backend == "trt" and builder.build_thread == threading.current_thread().name
    eng.close()
