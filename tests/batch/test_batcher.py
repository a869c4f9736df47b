"""The dynamic batcher with the real onnxruntime engine and the shipped model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from appliance.batch import Batcher
from appliance.contracts import FeatureRow, Score
from appliance.infer import load_bundle, select_engine


def make_batcher(out: list[list[Score]], **kw: int) -> Batcher:
    bundle = load_bundle("cnc_anomaly")
    engine, _ = select_engine(bundle)

    def emit(scores: Sequence[Score]) -> None:
        out.append(list(scores))

    return Batcher(engine, emit, **kw)


def rows(n: int, machine: str = "m") -> list[FeatureRow]:
    bundle = load_bundle("cnc_anomaly")
    vecs = bundle.golden_inputs
    return [FeatureRow(f"{machine}{i}", float(i), vecs[i % len(vecs)]) for i in range(n)]


def test_rows_from_many_machines_are_scored_in_one_batch_up_to_max_batch() -> None:
    out: list[list[Score]] = []

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
    flat = [s for batch in out for s in batch]
    expected = bundle.golden_outputs[[i % len(bundle.golden_outputs) for i in range(20)]]
    np.testing.assert_allclose([s.score for s in flat], expected, atol=1e-4)
    assert [s.machine for s in flat] == [f"m{i}" for i in range(20)]


def test_a_lone_row_is_dispatched_after_max_delay() -> None:
    out: list[list[Score]] = []

    async def go() -> float:
        b = make_batcher(out, max_batch=32, max_delay_ms=50)
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
    out: list[list[Score]] = []

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
    assert [s.machine for s in out[0]] == ["m2", "m3", "m4"]


def test_drain_scores_queued_rows_at_shutdown() -> None:
    out: list[list[Score]] = []

    async def go() -> None:
        b = make_batcher(out, max_batch=32, max_delay_ms=10_000)
        await b.start()
        for r in rows(3):
            b.submit(r)
        await b.drain()
        await b.close()

    asyncio.run(go())
    assert sum(map(len, out)) == 3
