"""Where the event loop is held: the appliance in this process against the hotpath cell, and
every event-loop callback that took more than ``--threshold-ms`` of CPU, by name.

A poll starts late when the loop is busy with something else at its deadline. On a shared
machine the wall-clock lateness mostly measures the other processes (the run queue), so this
script measures the loop's own work instead: the CPU time (``time.thread_time``) of each
callback the loop runs (``asyncio.Handle._run`` wrapped), and of each garbage collection
(``gc.callbacks``). The cell is :mod:`benchmarks.bench`'s, ``appliance simulate`` in its own
process: bench-50 machines (``--profile hotpath``: the first registers named after the model's
channels, every window scored, as the ``hotpath`` scenario), or the cnc-sim cell (``--profile
cnc-sim``); Mosquitto on a free port.

    .venv/bin/python benchmarks/loop_profile.py --machines 100 --seconds 20

Prints the appliance's CPU (% of one core, all threads), the poll jitter from its own stats,
the number of callbacks over the threshold and over 5 ms, the CPU of ``Appliance.stats()`` (what
the API's ``/metrics`` costs the loop), the collections per generation, and
the callbacks over the threshold grouped by name (count, p50, max). ``--wall-ms`` also lists
the callbacks that held the loop longer than that in wall time, with their CPU (much wall and
little CPU: the thread was descheduled or waited for the GIL or a lock). ``--cprofile`` adds a
cProfile of everything the loop ran (slower: the figures above then include its overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import cProfile
import gc
import os
import pstats
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.config import load_config  # noqa: E402
from appliance.runtime import Appliance  # noqa: E402
from benchmarks.bench import HOTPATH_RULES, Rig, hotpath_profile  # noqa: E402


def callback_name(handle: asyncio.events.Handle) -> str:
    cb: Any = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro: Any = owner.get_coro()
        name = owner.get_name()
        if name.startswith("acquire "):
            name = "acquire <device>"
        return f"task {name}: {getattr(coro, '__qualname__', coro)}"
    return str(getattr(cb, "__qualname__", None) or repr(cb)[:80])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threshold-ms", type=float, default=2.0)
    p.add_argument("--profile", choices=("hotpath", "cnc-sim"), default="hotpath")
    p.add_argument(
        "--wall-ms",
        type=float,
        default=0.0,
        help="also list callbacks that held the loop longer than this in wall time, with "
        "their CPU (0: off)",
    )
    p.add_argument(
        "--gc-threshold",
        default=None,
        metavar="G0,G1,G2",
        help="gc.set_threshold for the run (default: the appliance's own, as `appliance run`)",
    )
    p.add_argument("--cprofile", action="store_true")
    args = p.parse_args(argv)

    slow: dict[str, list[float]] = defaultdict(list)
    gcs: list[tuple[int, float]] = []
    measuring = [False]
    prof = cProfile.Profile() if args.cprofile else None
    threshold_s = args.threshold_ms / 1000.0
    wall_s = args.wall_ms / 1000.0
    held: list[tuple[float, float, str]] = []
    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        if not measuring[0]:
            run(self)
            return
        t = time.thread_time()
        w = time.perf_counter()
        if prof is not None:
            prof.enable()
        run(self)
        if prof is not None:
            prof.disable()
        spent = time.thread_time() - t
        wall = time.perf_counter() - w
        if spent > threshold_s:
            slow[callback_name(self)].append(spent * 1000.0)
        if wall_s and wall > wall_s:
            held.append((wall * 1000.0, spent * 1000.0, callback_name(self)))

    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.thread_time()
        elif measuring[0]:
            gcs.append((info["generation"], (time.thread_time() - gc_started[0]) * 1000.0))

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    with tempfile.TemporaryDirectory(prefix="loop-profile-") as tmp:
        cell = "bench-50" if args.profile == "hotpath" else "cnc-sim"
        with Rig(Path(tmp), args.machines, 42, cell, tag="-loop") as rig:
            if args.profile == "hotpath":
                path = rig.write_config(10.0, 100, str(hotpath_profile(Path(tmp))), HOTPATH_RULES)
            else:
                path = rig.write_config(10.0, 100)
            app = Appliance(load_config(path), freeze_gc=True)  # as `appliance run` does

            async def go() -> tuple[float, dict[str, Any]]:
                await app.start()
                if args.gc_threshold:
                    gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
                await asyncio.sleep(args.warmup)
                thresholds.append(gc.get_threshold())
                measuring[0] = True
                cpu0, t0 = time.process_time(), time.perf_counter()
                await asyncio.sleep(args.seconds)
                cpu1, t1 = time.process_time(), time.perf_counter()
                measuring[0] = False
                for _ in range(5):  # what the API's /metrics costs the loop
                    t = time.thread_time()
                    stats = app.stats()
                    stats_ms.append((time.thread_time() - t) * 1000.0)
                    await asyncio.sleep(0.2)
                await app.stop(5.0)
                return (cpu1 - cpu0) / (t1 - t0), stats

            stats_ms: list[float] = []
            thresholds: list[tuple[int, int, int]] = []
            cpu, stats = asyncio.run(go())
    acq = stats["acquisition"]
    p99 = sorted(float(d["jitter_ms_p99"]) for d in acq)
    every = [ms for v in slow.values() for ms in v]
    print(
        f"{args.machines} machines ({args.profile}), {args.seconds:g} s: CPU {100 * cpu:.1f} % of "
        f"one core; load average {os.getloadavg()[0]:.2f}; poll jitter p99 median device "
        f"{p99[len(p99) // 2]:.2f} ms, worst {p99[-1]:.2f} ms; overruns "
        f"{sum(int(d['overruns']) for d in acq)}; gc thresholds {thresholds[0]}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB; frames "
        f"{stats['frames']}, feature rows {stats['feature_rows']}"
    )
    print(
        f"loop callbacks over {args.threshold_ms:g} ms of CPU: {len(every)}, over 5 ms: "
        f"{sum(1 for ms in every if ms > 5.0)}, longest {max(every, default=0.0):.1f} ms"
    )
    stats_ms.sort()
    print(
        f"Appliance.stats(), 5 calls after the measured window: p50 {stats_ms[2]:.1f} ms, max "
        f"{stats_ms[-1]:.1f} ms of CPU"
    )
    for gen in (0, 1, 2):
        spent = [ms for g, ms in gcs if g == gen]
        if spent:
            print(
                f"garbage collections, generation {gen}: {len(spent)}, longest "
                f"{max(spent):.1f} ms, {sum(spent):.0f} ms in all"
            )
    for name, spent in sorted(slow.items(), key=lambda kv: -len(kv[1]))[:15]:
        spent.sort()
        p50 = spent[len(spent) // 2]
        print(f"{len(spent):5d} x p50 {p50:6.1f} ms max {spent[-1]:6.1f} ms  {name}")
    if wall_s:
        print(f"loop held over {args.wall_ms:g} ms of wall time: {len(held)}")
        for wall_ms, cpu_ms, name in sorted(held, reverse=True)[:15]:
            print(f"  {wall_ms:6.1f} ms wall, {cpu_ms:6.1f} ms CPU  {name}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
