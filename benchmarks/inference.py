#!/usr/bin/env python3
"""Inference benchmark: engines against bare loops, the Batcher's own cost, window → score.

Three parts, all on the shipped model (``--model``, default ``cnc_anomaly``):

* ``engines``: for every backend of the serving chain present on this host, rows/s at each
  ``--batches`` size through ``Engine.infer`` (validation, timing, counting) and through
  ``ServingEngine.infer`` (what the batcher calls), against a bare loop at the same batch: a
  plain ``onnxruntime.InferenceSession.run`` with the same providers and thread settings for the
  onnxruntime backends (none for others: "bare" is then null). Each loop runs for ``--seconds``;
  the three loops are interleaved ``--repeat`` times and the best run of each is kept.
* ``batcher``: the Batcher's round trip at each batch size (``max_batch`` = the batch,
  ``max_delay_ms`` large, so a batch goes out when full): rows handed over → the ``ScoreBatch``
  handed to the consumer on the event loop (timed inside the consumer), ``--roundtrips``
  times, rows given as columns (``submit_many``) and one ``FeatureRow`` at a time
  (``submit``). The batcher's added cost per round trip is the round trip minus the backend's
  own inference time for that call (``EngineStats.last_ms``: the ``_infer_impl`` call, so the
  engine's validation and the serving chain count as added); a least-squares line through
  the medians gives µs per batch + µs per row (issue 13's target: ≤ 20 µs per batch + ≤ 0.2 µs
  per row).
* ``window_to_score``: ``--machines`` machine windows close at once (the window aggregator's
  sink call for each, through the real ``FeatureBuilder``) → their scores delivered by the
  Batcher, p50/p99 per window over ``--rounds`` rounds, for each ``--latency-configs``
  ``max_batch:max_delay_ms`` pair (default: the config defaults 32:20; 100:20, one batch per
  boundary; 128:5, a shorter delay). Every window of a round waits for the rows that fill its
  batch or for max_delay_ms: the batcher cannot know no more windows are coming.

Two more figures split the batcher's added cost: its own work on the event loop per batch
(``submit_many`` + taking the batch out, and delivering the ScoreBatch, without the worker), and
the thread hand-off alone (a no-op job through a ``SimpleQueue`` worker and
``call_soon_threadsafe`` back): the floor of any batcher that keeps inference off the loop.

Run ``python benchmarks/inference.py --help``; figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.batch import Batcher
from appliance.contracts import FeatureRow, ScoreBatch, Window
from appliance.features import FeatureBuilder
from appliance.infer import EngineOptions, ServingEngine, load_bundle
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.select import AUTO_ORDER, FACTORIES, BackendUnavailable

TARGET_BATCH_US = 20.0
TARGET_ROW_US = 0.2


def rows_for(bundle: ModelBundle, n: int) -> np.ndarray:
    reps = -(-n // len(bundle.golden_inputs))
    return np.ascontiguousarray(np.tile(bundle.golden_inputs, (reps, 1))[:n])


def present_backends(bundle: ModelBundle, opts: EngineOptions) -> dict[str, str | None]:
    """Backend name → None when present, else why it is absent."""
    out: dict[str, str | None] = {}
    for name in AUTO_ORDER:
        try:
            out[name] = FACTORIES[name](bundle, opts).unavailable_reason()
        except (BackendUnavailable, ImportError) as err:
            out[name] = str(err)
    return out


def time_loop(fn: Any, seconds: float) -> tuple[int, float]:
    """Call ``fn()`` for about ``seconds`` (at least 20 calls); (calls, elapsed s)."""
    for _ in range(5):
        fn()
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(10):
            fn()
        n += 10
        t = time.perf_counter()
        if t >= deadline and n >= 20:
            return n, t - t0


def bare_runner(engine: Engine, batch: np.ndarray) -> Any:
    """A plain onnxruntime session like the engine's, or None for non-onnxruntime backends."""
    providers = getattr(engine, "providers", None)
    if providers is None:
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = getattr(engine, "threads", 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    b = engine.bundle
    sess = ort.InferenceSession(str(b.onnx_path), sess_options=opts, providers=providers)
    feeds = {b.input_name: batch}
    names = [b.output_name]
    return lambda: sess.run(names, feeds)


def bench_engines(
    bundle: ModelBundle, backends: Sequence[str], batches: Sequence[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    opts = EngineOptions(threads=args.threads, max_batch=max(4096, max(batches)))
    results: list[dict[str, Any]] = []
    for name in backends:
        serving = ServingEngine(bundle, name, opts)
        serving.start()
        engine = serving.engine
        assert engine is not None
        for n in batches:
            x = rows_for(bundle, n)
            loops: dict[str, Any] = {
                "bare": bare_runner(engine, x),
                "engine": lambda x=x, e=engine: e.infer(x),
                "serving": lambda x=x, s=serving: s.infer(x),
            }
            best: dict[str, float | None] = {k: None for k in loops}
            for _ in range(args.repeat):
                for key, fn in loops.items():
                    if fn is None:
                        continue
                    calls, elapsed = time_loop(fn, args.seconds)
                    rate = n * calls / elapsed
                    cur = best[key]
                    best[key] = rate if cur is None else max(cur, rate)
            bare = best["bare"]
            row = {
                "backend": name,
                "batch": n,
                "bare_rows_per_s": bare,
                "engine_rows_per_s": best["engine"],
                "serving_rows_per_s": best["serving"],
                "engine_pct_of_bare": None if not bare else 100 * (best["engine"] or 0) / bare,
                "serving_pct_of_bare": None if not bare else 100 * (best["serving"] or 0) / bare,
            }
            results.append(row)
            print(
                f"  {name:<17} batch {n:>5}: bare {bare or 0:>12.6g} rows/s, engine "
                f"{row['engine_rows_per_s']:>12.6g}, serving {row['serving_rows_per_s']:>12.6g}",
                flush=True,
            )
        serving.close()
    return results


async def _roundtrips(
    bundle: ModelBundle, n: int, reps: int, columnar: bool, threads: int
) -> dict[str, Any]:
    engine = ServingEngine(
        bundle, "onnxruntime-cpu", EngineOptions(threads=threads, max_batch=max(4096, n))
    )
    done = asyncio.Event()
    got: list[ScoreBatch] = []
    delivered = [0.0]

    def emit(sb: ScoreBatch) -> None:
        delivered[0] = time.perf_counter()  # the consumer has the scores now
        got.append(sb)
        done.set()

    b = Batcher(engine, emit, max_batch=n, max_delay_ms=60_000, queue_size=max(1024, 2 * n))
    await b.start()
    x = rows_for(bundle, n)
    machines = [f"m{i}" for i in range(n)]
    ends = np.full(n, 1.0e9)
    rows = [FeatureRow(machines[i], 1.0e9, x[i]) for i in range(n)]
    rt = np.empty(reps)
    infer_s = np.empty(reps)
    for i in range(reps + 5):
        done.clear()
        t0 = time.perf_counter()
        if columnar:
            b.submit_many(machines, ends, x)
        else:
            for r in rows:
                b.submit(r)
        await done.wait()
        if i >= 5:
            rt[i - 5] = delivered[0] - t0
            assert engine.engine is not None
            infer_s[i - 5] = engine.engine.stats.last_ms / 1e3
    await b.close()
    assert sum(len(s) for s in got) == n * (reps + 5)
    added = rt - infer_s
    return {
        "batch": n,
        "submit": "submit_many" if columnar else "submit",
        "roundtrips": reps,
        "roundtrip_p50_us": float(np.percentile(rt, 50) * 1e6),
        "roundtrip_p99_us": float(np.percentile(rt, 99) * 1e6),
        "infer_p50_us": float(np.percentile(infer_s, 50) * 1e6),
        "added_p50_us": float(np.percentile(added, 50) * 1e6),
        "added_p99_us": float(np.percentile(added, 99) * 1e6),
    }


async def _loop_side_cost(bundle: ModelBundle, n: int, reps: int) -> dict[str, Any]:
    """The batcher's own work on the event loop for one batch of ``n`` rows, without the
    hand-off: ``submit_many`` + taking the batch out (the job is taken off the worker queue
    unrun), then ``_done`` delivering a ScoreBatch (to a consumer that only keeps it)."""
    engine = ServingEngine(bundle, "onnxruntime-cpu", EngineOptions(max_batch=max(4096, n)))
    got: list[ScoreBatch] = []
    b = Batcher(engine, got.append, max_batch=n, max_delay_ms=60_000, queue_size=max(1024, 2 * n))
    b._loop = asyncio.get_running_loop()
    b._wakeup = asyncio.Event()
    x = rows_for(bundle, n)
    machines = [f"m{i}" for i in range(n)]
    ends = np.full(n, 1.0e9)
    scores = np.zeros(n, np.float32)
    names = tuple(machines)
    t_in, t_out = np.empty(reps), np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter()
        b.submit_many(machines, ends, x)
        t1 = time.perf_counter()
        b._jobs.get_nowait()
        t2 = time.perf_counter()
        b._done(names, ends, scores, "onnxruntime-cpu", None)
        t3 = time.perf_counter()
        t_in[i], t_out[i] = t1 - t0, t3 - t2
        got.clear()
    return {
        "batch": n,
        "submit_and_launch_p50_us": float(np.percentile(t_in, 50) * 1e6),
        "deliver_p50_us": float(np.percentile(t_out, 50) * 1e6),
    }


async def _handoff_floor(reps: int) -> dict[str, float]:
    """The cost of the hand-off alone: a no-op job through the same kind of worker thread
    (``SimpleQueue`` in, ``call_soon_threadsafe`` back) and back on the loop."""
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def work() -> None:
        while (fut := jobs.get()) is not None:
            loop.call_soon_threadsafe(fut.set_result, time.perf_counter())

    th = threading.Thread(target=work, daemon=True)
    th.start()
    t = np.empty(reps)
    for i in range(reps + 20):
        fut = loop.create_future()
        t0 = time.perf_counter()
        jobs.put(fut)
        await fut
        if i >= 20:
            t[i - 20] = time.perf_counter() - t0
    jobs.put(None)
    th.join()
    p50, p99 = np.percentile(t, [50, 99]) * 1e6
    return {"p50_us": float(p50), "p99_us": float(p99)}


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares ``added_p50_us = per_batch + per_row * batch``."""
    n = np.array([r["batch"] for r in rows], float)
    y = np.array([r["added_p50_us"] for r in rows], float)
    per_row, per_batch = np.polyfit(n, y, 1)
    return {"per_batch_us": float(per_batch), "per_row_us": float(per_row)}


def windows_for(bundle: ModelBundle, machines: int, end: float) -> list[Window]:
    channels = tuple(dict.fromkeys(f.channel for f in bundle.features))
    k = len(channels)
    rng = np.random.default_rng(1)
    out = []
    for m in range(machines):
        v = rng.normal(50, 5, k)
        out.append(
            Window(
                f"cnc-{m + 1}",
                end - 1.0,
                end,
                channels,
                np.full(k, 10, np.int32),
                v,
                v * 1.01,
                v - 1,
                v + 1,
                v,
            )
        )
    return out


async def _window_to_score(
    bundle: ModelBundle, machines: int, rounds: int, max_batch: int, max_delay_ms: int, threads: int
) -> dict[str, Any]:
    engine = ServingEngine(
        bundle, "onnxruntime-cpu", EngineOptions(threads=threads, max_batch=max(max_batch, 64))
    )
    arrived: list[float] = []
    pending = 0
    done = asyncio.Event()

    def emit(sb: ScoreBatch) -> None:
        nonlocal pending
        t = time.perf_counter()
        arrived.extend([t] * len(sb))
        pending -= len(sb)
        if pending <= 0:
            done.set()

    b = Batcher(engine, emit, max_batch=max_batch, max_delay_ms=max_delay_ms, queue_size=4096)
    await b.start()
    builder = FeatureBuilder(bundle.features, b.submit)
    lat: list[float] = []
    for r in range(rounds + 3):
        ws = windows_for(bundle, machines, 1.0e9 + r)
        arrived.clear()
        pending = machines
        done.clear()
        await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        for w in ws:  # the aggregator closes every machine's window at the same boundary
            builder(w)
        await done.wait()
        if r >= 3:
            lat.extend(t - t0 for t in arrived)
    await b.close()
    a = np.array(lat)
    return {
        "machines": machines,
        "rounds": rounds,
        "max_batch": max_batch,
        "max_delay_ms": max_delay_ms,
        "windows": len(a),
        "p50_ms": float(np.percentile(a, 50) * 1e3),
        "p99_ms": float(np.percentile(a, 99) * 1e3),
        "max_ms": float(a.max() * 1e3),
        "batches": b.batches,
    }


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "numpy": np.__version__,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cnc_anomaly")
    p.add_argument("--batches", default="1,32,256,1024", help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=1.0, help="per engine loop run")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs, best kept")
    p.add_argument("--roundtrips", type=int, default=500, help="Batcher round trips per size")
    p.add_argument("--machines", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200, help="window-close rounds")
    p.add_argument("--latency-configs", default="32:20,100:20,128:5", metavar="MB:MS,...")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON summary")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = load_bundle(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    info = machine_info()
    print(f"machine: {info}", flush=True)
    avail = present_backends(bundle, EngineOptions(max_batch=max(4096, max(batches))))
    for name, why in avail.items():
        if why is not None:
            print(f"  {name:<17} absent: {why}")
    backends = [n for n, why in avail.items() if why is None]
    print("engines (rows/s, best of repeats):", flush=True)
    engines = bench_engines(bundle, backends, batches, args)

    print("batcher round trip (rows in → ScoreBatch delivered):", flush=True)
    batcher: list[dict[str, Any]] = []
    for columnar in (True, False):
        for n in batches:
            r = asyncio.run(_roundtrips(bundle, n, args.roundtrips, columnar, args.threads))
            batcher.append(r)
            print(
                f"  {r['submit']:<11} batch {n:>5}: round trip p50 {r['roundtrip_p50_us']:.6g} µs"
                f" p99 {r['roundtrip_p99_us']:.6g} µs, inference p50 {r['infer_p50_us']:.6g} µs,"
                f" added p50 {r['added_p50_us']:.6g} µs",
                flush=True,
            )
    fits = {
        kind: fit([r for r in batcher if r["submit"] == kind]) for kind in ("submit_many", "submit")
    }
    loop_side = [asyncio.run(_loop_side_cost(bundle, n, args.roundtrips)) for n in batches]
    for c in loop_side:
        print(
            f"  batcher work on the loop, batch {c['batch']:>5}: submit_many + launch "
            f"{c['submit_and_launch_p50_us']:.6g} µs, deliver {c['deliver_p50_us']:.6g} µs (p50)"
        )
    floor = asyncio.run(_handoff_floor(args.roundtrips))
    print(
        f"  thread hand-off alone (no-op job, loop → worker → loop): p50 {floor['p50_us']:.6g} µs,"
        f" p99 {floor['p99_us']:.6g} µs"
    )
    for kind, f in fits.items():
        print(
            f"  batcher added cost ({kind}): {f['per_batch_us']:.6g} µs per batch + "
            f"{f['per_row_us']:.6g} µs per row"
        )

    print("window close → score delivered:", flush=True)
    latency: list[dict[str, Any]] = []
    for cfg in args.latency_configs.split(","):
        mb, delay = (int(v) for v in cfg.split(":"))
        r = asyncio.run(
            _window_to_score(bundle, args.machines, args.rounds, mb, delay, args.threads)
        )
        latency.append(r)
        print(
            f"  {args.machines} machines, max_batch {mb}, max_delay_ms {delay}: p50 "
            f"{r['p50_ms']:.6g} ms, p99 {r['p99_ms']:.6g} ms, max {r['max_ms']:.6g} ms",
            flush=True,
        )
    cm = fits["submit_many"]
    summary = {
        "machine": info,
        "model": f"{bundle.name} {bundle.version}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "absent": {n: why for n, why in avail.items() if why is not None},
        "engines": engines,
        "batcher": batcher,
        "batcher_added_cost": fits,
        "handoff_floor": floor,
        "batcher_loop_side": loop_side,
        "window_to_score": latency,
        "targets": {
            "batcher_per_batch_le_20us": cm["per_batch_us"] <= TARGET_BATCH_US,
            "batcher_per_row_le_0_2us": cm["per_row_us"] <= TARGET_ROW_US,
            "engine_within_10pct_of_bare_at_batch_ge_32": all(
                r["engine_pct_of_bare"] >= 90
                for r in engines
                if r["batch"] >= 32 and r["engine_pct_of_bare"] is not None
            ),
        },
    }
    print(f"targets: {summary['targets']}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
