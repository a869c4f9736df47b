"""The dynamic batcher with the real onnxruntime engine and the shipped model."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import numpy.typing as npt

from appliance.batch import Batcher
from appliance.contracts import FeatureRow, ScoreBatch
from appliance.infer import EngineOptions, ServingEngine, load_bundle
from appliance.infer.base import Engine
from appliance.infer.ort import OrtEngine
from appliance.infer.select import BackendFactory


def make_batcher(
    out: list[ScoreBatch], factories: dict[str, BackendFactory] | None = None, **kw: int
) -> Batcher:
    bundle = load_bundle("cnc_anomaly")
    backend = "auto" if factories else "onnxruntime-cpu"
    order = tuple(factories) if factories else ("onnxruntime-cpu",)
    engine = ServingEngine(bundle, backend, factories=factories, order=order)
    return Batcher(engine, out.append, **kw)


class SlowEngineDouble(OrtEngine):
    """Test double: the real onnxruntime CPU engine, but every call takes ``delay_s`` longer
    (a slow accelerator call, which nothing on this machine reproduces on demand)."""

    delay_s = 0.15

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if len(batch) < len(self.bundle.golden_inputs):  # not the parity check at start
            time.sleep(self.delay_s)
        return super()._infer_impl(batch)


def slow_factory(bundle: object, opts: EngineOptions) -> Engine:
    return SlowEngineDouble(load_bundle("cnc_anomaly"), providers=["CPUExecutionProvider"])


def rows(n: int, machine: str = "m") -> list[FeatureRow]:
    bundle = load_bundle("cnc_anomaly")
    vecs = bundle.golden_inputs
    return [FeatureRow(f"{machine}{i}", float(i), vecs[i % len(vecs)]) for i in range(n)]


def test_rows_from_many_machines_are_scored_in_one_batch_up_to_max_batch() -> None:
    out: list[ScoreBatch] = []

    async def go() -> None:
        b = make_batcher(out, max_batch=8, max_delay_ms=200)
        await b.start()
        for r in rows(20):
            b.submit(r)
        for _ in range(200):
            if sum(map(len, out)) == 20:
                break
            await asyncio.sleep(0.01)
        await b.close()

    asyncio.run(go())
    assert [len(s) for s in out] == [8, 8, 4]
    bundle = load_bundle("cnc_anomaly")
    expected = bundle.golden_outputs[[i % len(bundle.golden_outputs) for i in range(20)]]
    np.testing.assert_allclose(np.concatenate([b.score for b in out]), expected, atol=1e-4)
    assert [m for b in out for m in b.machines] == [f"m{i}" for i in range(20)]
    np.testing.assert_array_equal(np.concatenate([b.window_end for b in out]), np.arange(20.0))
    assert {b.backend for b in out} == {"onnxruntime-cpu"}
    assert all(b.score.dtype == np.float32 and b.window_end.dtype == np.float64 for b in out)


def test_a_lone_row_is_dispatched_after_max_delay() -> None:
    out: list[ScoreBatch] = []

    async def go() -> float:
        b = make_batcher(out, max_batch=32, max_delay_ms=100)
        await b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        b.submit(rows(1)[0])
        while not out:
            await asyncio.sleep(0.005)
        waited = loop.time() - t0
        await b.close()
        return waited

    waited = asyncio.run(go())
    assert len(out) == 1 and len(out[0]) == 1
    assert waited >= 0.045  # it waited for companions, but dispatched without them


def test_full_queue_drops_the_oldest_rows_and_counts_them() -> None:
    out: list[ScoreBatch] = []

    async def go() -> Batcher:
        b = make_batcher(out, max_batch=4, max_delay_ms=1000, queue_size=3)
        for r in rows(5):
            b.submit(r)  # before start(): nothing is consumed yet
        await b.start()
        await b.drain()
        await b.close()
        return b

    b = asyncio.run(go())
    assert b.dropped == 2
    assert out[0].machines == ("m2", "m3", "m4")


def test_drain_scores_queued_rows_at_shutdown() -> None:
    out: list[ScoreBatch] = []

    async def go() -> None:
        b = make_batcher(out, max_batch=32, max_delay_ms=10_000)
        await b.start()
        for r in rows(3):
            b.submit(r)
        await b.drain()
        await b.close()

    asyncio.run(go())
    assert sum(map(len, out)) == 3


def test_columnar_rows_are_scored_like_single_rows_and_wrap_around_the_ring() -> None:
    out: list[ScoreBatch] = []
    bundle = load_bundle("cnc_anomaly")
    g = bundle.golden_inputs

    async def go() -> None:
        b = make_batcher(out, max_batch=4, max_delay_ms=10_000, queue_size=6)
        await b.start()
        b.submit_many(["a0", "a1", "a2"], [0.0, 1.0, 2.0], g[:3])  # ring slots 0..2
        await b.drain()  # ring head now at 3: the next 5 rows wrap around the end
        b._stopping = False
        b.submit_many([f"b{i}" for i in range(5)], np.arange(5.0), g[3:8])
        await b.drain()
        await b.close()

    asyncio.run(go())
    assert [b.machines for b in out] == [
        ("a0", "a1", "a2"),
        ("b0", "b1", "b2", "b3"),
        ("b4",),
    ]
    np.testing.assert_allclose(
        np.concatenate([b.score for b in out]),
        bundle.golden_outputs[[0, 1, 2, 3, 4, 5, 6, 7]],
        atol=1e-4,
    )


def test_columnar_overflow_drops_the_oldest_rows_and_counts_them() -> None:
    out: list[ScoreBatch] = []
    g = load_bundle("cnc_anomaly").golden_inputs

    async def go() -> Batcher:
        b = make_batcher(out, max_batch=8, max_delay_ms=10_000, queue_size=4)
        b.submit_many(["x0", "x1", "x2"], [0.0, 1.0, 2.0], g[:3])
        b.submit_many(["y0", "y1", "y2"], [3.0, 4.0, 5.0], g[3:6])  # drops x0, x1
        b.submit_many([f"z{i}" for i in range(6)], np.arange(6.0), g[:6])  # keeps z2..z5
        await b.start()
        await b.drain()
        await b.close()
        return b

    b = asyncio.run(go())
    assert b.dropped == 2 + 4 + 2 and b.submitted == 12
    assert out[0].machines == ("z2", "z3", "z4", "z5")


def test_rows_queued_behind_a_slow_call_go_out_when_it_returns_not_max_delay_later() -> None:
    """One batch in flight, one filling: a row that waited through a 150 ms engine call is
    already past its 100 ms max_delay, so it is dispatched as soon as the call returns."""
    out: list[ScoreBatch] = []
    delivered: list[float] = []

    async def go() -> float:
        b = make_batcher(out, {"slow": slow_factory}, max_batch=32, max_delay_ms=100)
        b._emit = lambda sb: (out.append(sb), delivered.append(time.monotonic()))  # type: ignore[method-assign]
        await b.start()
        r = rows(2)
        b.submit(r[0])
        await asyncio.sleep(0.11)  # the first batch (1 row) went out at 0.1 s: in flight now
        assert b.stats()["in_flight"] == 1
        b.submit(r[1])
        t_second = time.monotonic()
        while len(out) < 2:
            await asyncio.sleep(0.002)
        await b.close()
        return t_second

    t_second = asyncio.run(go())
    assert [len(x) for x in out] == [1, 1]
    # the first call returns at 0.25 s (0.14 s after the 2nd row arrived), the 2nd batch then
    # takes one more 0.15 s call: 0.29 s. Had its 100 ms timer started only when the first call
    # returned, delivery would come 0.39 s after it arrived.
    waited = delivered[1] - t_second
    assert 0.28 <= waited < 0.36, waited
